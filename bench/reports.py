"""B6: usage reports over 1,000,000 ledger rows on PostgreSQL (1,000 projects).

The rows are generated in SQL (``generate_series``): 1,000 projects with one
allocation each on the ``local`` cluster, ``charge`` rows spread over 180 days and
10 users. Then, through a live server, the per-project report
(``GET /v1/projects/{code}/usage?group_by=month``) and the portfolio of all
1,000 allocations (``GET /v1/usage/allocations``) are timed (p50 of N requests).
There is no raw baseline: the targets are absolute.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bench.harness import PY, Figure, free_port, server
from bench.loadgen import run_load
from broker.auth import issue_token
from tests.support.env import broker_env, fresh_database, make_settings


def _seed(url: str, *, projects: int, rows: int) -> float:
    engine = sa.create_engine(url)
    t0 = time.perf_counter()
    with engine.begin() as conn:
        cluster_id = conn.execute(sa.text("SELECT id FROM clusters WHERE name = 'local'")).scalar_one()
        conn.execute(sa.text(
            "INSERT INTO users (name, created_at) SELECT 'user' || g, now() FROM generate_series(1, 10) g "
            "ON CONFLICT DO NOTHING"))
        conn.execute(sa.text(
            "INSERT INTO projects (code, title, status, access_mode, attributes, created_at) "
            "SELECT 'EHPC-B6-' || lpad(g::text, 4, '0'), 'bench', 'active', 'playground', '{}', now() "
            "FROM generate_series(1, :n) g"), {"n": projects})
        conn.execute(sa.text(
            "INSERT INTO allocations (project_id, cluster_id, unit, granted, charged, reserved, account, "
            "thresholds, created_at, start_date, end_date) "
            "SELECT p.id, :c, 'core_hours', 10000000000000, 0, 0, 'acct-' || p.id, '[80, 95, 100]', now(), "
            "current_date - 200, current_date + 165 FROM projects p WHERE p.code LIKE 'EHPC-B6-%'"),
            {"c": cluster_id})
        conn.execute(sa.text(
            "INSERT INTO ledger_entries (allocation_id, project_id, kind, amount, user_id, actor, reason, "
            "created_at, occurred_at) "
            "SELECT a.id, a.project_id, 'charge', 1000000 + (g % 977), "
            "(SELECT min(id) FROM users) + (g % 10), 'bench', '', now(), "
            "now() - ((g % 180) || ' days')::interval "
            "FROM generate_series(1, :rows) g "
            "JOIN allocations a ON a.id = (SELECT min(id) FROM allocations "
            "WHERE account LIKE 'acct-%') + (g % :n)"), {"rows": rows, "n": projects})
        conn.execute(sa.text(
            "UPDATE allocations a SET charged = s.total FROM (SELECT allocation_id, sum(amount) total "
            "FROM ledger_entries GROUP BY allocation_id) s WHERE s.allocation_id = a.id"))
        conn.execute(sa.text("ANALYZE"))
    engine.dispose()
    return time.perf_counter() - t0


def b6(*, runs: int, projects: int = 1000, rows: int = 1_000_000, requests: int = 20) -> list[Figure]:
    one = Figure("B6", f"per-project usage report (group_by=month), {rows:,} ledger rows, PostgreSQL",
                 "ms p50", "≤ 100 ms", max_value=100)
    portfolio = Figure("B6", f"portfolio of {projects:,} allocations, {rows:,} ledger rows, PostgreSQL",
                       "ms p50", "≤ 500 ms", max_value=500)
    tmp = Path(tempfile.mkdtemp(prefix="aifa-bench-b6-"))
    with fresh_database("postgresql", tmp) as url:
        with broker_env(tmp, url, run_tracker=False):
            pass  # migrations + the local cluster
        one.extra["seed_s"] = _seed(url, projects=projects, rows=rows)
        settings = make_settings(tmp, url)
        port = free_port()
        senv = {**os.environ, "AIFA_BROKER_DATA_DIR": str(settings.data_dir), "AIFA_BROKER_DATABASE_URL": url,
                "AIFA_BROKER_RUN_TRACKER": "false", "AIFA_BROKER_LOG_LEVEL": "WARNING"}
        senv.pop("PROMETHEUS_MULTIPROC_DIR", None)
        qm = {"Authorization": f"Bearer {issue_token(settings, sub='qm', roles=['quota_manager'])}"}
        bin_ = str(Path(PY).parent / "aifa-broker")
        with server([bin_, "serve", "--port", str(port), "--workers", "2"], senv, port, workers=2):
            base = f"http://127.0.0.1:{port}"
            codes = [f"EHPC-B6-{i:04d}" for i in range(1, requests + 1)]
            run_load(base, [("GET", f"/v1/projects/{codes[0]}/usage?group_by=month", qm, None)], concurrency=1)
            for _ in range(runs):
                res = run_load(base, [("GET", f"/v1/projects/{c}/usage?group_by=month", qm, None) for c in codes],
                               concurrency=1)
                assert res.errors() == 0, res.statuses
                one.runs.append(res.p50_ms)
                res = run_load(base, [("GET", "/v1/usage/allocations", qm, None)] * max(5, requests // 4),
                               concurrency=1)
                assert res.errors() == 0, res.statuses
                portfolio.runs.append(res.p50_ms)
    return [one, portfolio]
