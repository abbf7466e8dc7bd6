"""B3 (admission vs a bare endpoint) and B8 (the ``local`` adapter's submission rate)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.harness import PY, Figure, free_port, server
from bench.loadgen import run_load
from broker.auth import issue_token
from broker.db import session_scope
from broker.services import ledger
from tests.support.env import broker_env, fresh_database, make_settings

PROJECT = "EHPC-BENCH-001"


@contextmanager
def noop_broker(db: str, *, workers: int, wrap: list[str] | None = None,
                start_timeout: float = 120) -> Iterator[dict[str, Any]]:
    """A fresh database with a project on the ``noop`` cluster and a broker serving it
    (``wrap``: a command the server runs under, e.g. valgrind)."""
    from bench import noop

    noop.install()
    tmp = Path(tempfile.mkdtemp(prefix="aifa-bench-"))
    with fresh_database(db, tmp) as url:
        with broker_env(tmp, url, run_tracker=False) as env:
            r = env.call("POST", "/v1/clusters", env.qm, json={
                "name": "noop", "adapter": "noop", "connection": {}, "default_partition": "cpu"})
            assert r.status_code == 201, r.text
            env.setup_project(PROJECT, amount=1e12, cluster="noop")
        settings = make_settings(tmp, url)
        port = free_port()
        senv = {**os.environ, "AIFA_BROKER_DATA_DIR": str(settings.data_dir), "AIFA_BROKER_DATABASE_URL": url,
                "AIFA_BROKER_RUN_TRACKER": "false", "AIFA_BROKER_LOG_LEVEL": "WARNING"}
        senv.pop("PROMETHEUS_MULTIPROC_DIR", None)
        argv = [*(wrap or []), PY, "-m", "bench.noop", "--port", str(port), "--workers", str(workers)]
        with server(argv, senv, port, timeout=start_timeout, workers=workers) as proc:
            yield {"base": f"http://127.0.0.1:{port}", "url": url, "env": senv, "proc": proc,
                   "token": issue_token(settings, sub="alice", roles=[]), "tmp": tmp}


def _over_allocation(url: str, accepted: int) -> dict[str, Any]:
    """Ledger drift, allocations over their grant, jobs recorded vs accepted answers."""
    engine = sa.create_engine(url)
    try:
        with session_scope(engine) as s:
            drift = ledger.check(s)
            over = s.execute(sa.text(
                "SELECT count(*) FROM allocations WHERE reserved + charged > granted")).scalar_one()
            jobs = s.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
            reserves = s.execute(sa.text(
                "SELECT count(*) FROM ledger_entries WHERE kind = 'reserve'")).scalar_one()
    finally:
        engine.dispose()
    return {"ledger_drift": len(drift), "allocations_over_grant": over, "jobs": jobs,
            "reserve_entries": reserves, "accepted_answers": accepted}


def b3(*, runs: int, n: int, concurrency: int, workers: int, db: str = "postgresql") -> Figure:
    fig = Figure("B3", f"admission (auth+eligibility+reserve+commit, noop adapter), c={concurrency}, "
                 f"{workers} workers, {db}", "req/s", "≥ 0.5× bare endpoint, zero over-allocation",
                 min_ratio=0.5)
    body = {"project": PROJECT, "cluster": "noop", "script": "true", "time_limit_minutes": 5}
    with noop_broker(db, workers=workers) as b:
        head = {"Authorization": f"Bearer {b['token']}"}
        run_load(b["base"], [("POST", "/v1/jobs", head, body)] * 60, concurrency=concurrency)  # warm-up
        accepted = 60
        p50s = []
        for _ in range(runs):
            res = run_load(b["base"], [("POST", "/v1/jobs", head, body)] * n, concurrency=concurrency)
            assert res.errors() == 0, res.statuses
            accepted += res.statuses[201]
            fig.runs.append(res.rate)
            p50s.append(res.p50_ms)
        fig.extra["p50_ms"] = p50s
        fig.extra["integrity"] = _over_allocation(b["url"], accepted)
        url = b["url"]
        port = free_port()
        benv = {**b["env"], "AIFA_BROKER_DATABASE_URL": url}
        with server([PY, "-m", "bench.bare", "--port", str(port), "--workers", str(workers)], benv, port,
                    workers=workers):
            base = f"http://127.0.0.1:{port}"
            run_load(base, [("POST", "/bare", head, body)] * 60, concurrency=concurrency)
            bare_p50 = []
            for _ in range(runs):
                res = run_load(base, [("POST", "/bare", head, body)] * n, concurrency=concurrency)
                assert res.errors() == 0, res.statuses
                fig.baseline_runs.append(res.rate)
                bare_p50.append(res.p50_ms)
        fig.extra["bare_p50_ms"] = bare_p50
    integrity = fig.extra["integrity"]
    if integrity["ledger_drift"] or integrity["allocations_over_grant"] or \
            integrity["jobs"] != integrity["accepted_answers"] or integrity["reserve_entries"] != integrity["jobs"]:
        fig.failed = f"integrity check failed: {integrity}"
    return fig


def b8(*, runs: int, n: int, concurrency: int) -> Figure:
    """Adapter-level submissions/s of ``local``; raw = the same number of fork+exec of
    the job (``/bin/sh -c true``) from Python, the floor of any local launcher."""
    from adapters.local import LocalAdapter
    from broker.adapter import JobSpec

    fig = Figure("B8", f"local adapter submit, {concurrency} threads", "submits/s", "≥ 200/s", min_value=200)
    for _ in range(runs):
        tmp = tempfile.mkdtemp(prefix="aifa-bench-local-")
        adapter = LocalAdapter("local", {"supervisor_idle_seconds": 5}, data_dir=tmp)
        spec = JobSpec(tag="warm", username="u", account="a", script="true", time_limit_minutes=5)
        adapter.submit(spec)  # starts the supervisor: once per data directory, not per job

        def one(i: int, adapter: LocalAdapter = adapter) -> None:
            adapter.submit(JobSpec(tag=f"t{i}", username="u", account="a", script="true", time_limit_minutes=5))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
        fig.runs.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["/bin/sh", "-c", "true"]) for _ in range(n)]
        for p in procs:
            p.wait()
        fig.baseline_runs.append(n / (time.perf_counter() - t0))
    fig.extra["baseline"] = "fork+exec of /bin/sh -c true from Python (no bookkeeping)"
    return fig
