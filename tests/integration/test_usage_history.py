"""Usage reports checked against an independent computation on a generated history:
many projects, users, clusters and months of charges, imports, grants, adjustments
and live reservations, inserted in bulk. Runs on SQLite and PostgreSQL; the
PostgreSQL run is the one the issue asks for (and the larger one)."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from broker.db import session_scope
from broker.models import Allocation, Cluster, ImportedJob, Job, LedgerEntry, Membership, Project, User
from broker.services import ledger
from broker.services.common import today
from tests.support.env import BrokerEnv, broker_env
from tests.support.tools import ROOT

M = 1_000_000


@dataclass
class Charge:
    project: str
    alloc: int
    cluster: str
    unit: str
    user: str
    partition: str
    amount: int
    at: datetime


@dataclass
class History:
    charges: list[Charge] = field(default_factory=list)
    allocs: dict[int, dict[str, Any]] = field(default_factory=dict)


@pytest.fixture
def history_env(db_url: str, tmp_path: Path) -> Iterator[tuple[BrokerEnv, History]]:
    with broker_env(tmp_path, db_url, run_tracker=False) as env:
        big = db_url.startswith("postgresql")
        yield env, _generate(env, projects=40 if big else 12, users=60 if big else 15,
                             charges=30_000 if big else 4_000)


def _generate(env: BrokerEnv, *, projects: int, users: int, charges: int) -> History:
    rnd = random.Random(20261126)
    h = History()
    now = datetime.now(UTC)
    first_day = today() - timedelta(days=365)
    with env.engine.begin() as conn:
        for name in ("alpha", "beta"):
            conn.execute(sa.insert(Cluster.__table__).values(  # type: ignore[attr-defined]
                name=name, adapter="local", description="", connection={}, cost_model={}, partitions=[],
                poll_interval_seconds=10.0, state="online", created_at=now))
        clusters = dict(conn.execute(sa.text("SELECT name, id FROM clusters")).all())
        conn.execute(sa.insert(User.__table__), [  # type: ignore[attr-defined]
            {"name": f"user{i:03d}", "created_at": now} for i in range(users)])
        user_ids = dict(conn.execute(sa.text("SELECT name, id FROM users")).all())
        statuses = ["active"] * 6 + ["suspended", "closed"]
        conn.execute(sa.insert(Project.__table__), [  # type: ignore[attr-defined]
            {"code": f"EHPC-GEN-{p:03d}", "title": f"Generated {p}", "status": rnd.choice(statuses),
             "access_mode": "playground", "attributes": {}, "created_at": now,
             "start_date": first_day, "end_date": today() + timedelta(days=rnd.randint(-10, 200))}
            for p in range(projects)])
        project_ids = dict(conn.execute(sa.text("SELECT code, id FROM projects")).all())
        alloc_rows = []
        for code in sorted(project_ids):
            for cluster, unit in rnd.sample([("alpha", "gpu_hours"), ("beta", "core_hours"),
                                             ("local", "node_hours")], rnd.randint(1, 2)):
                alloc_rows.append({"project_id": project_ids[code], "cluster_id": clusters[cluster], "unit": unit,
                                   "granted": 0, "charged": 0, "reserved": 0, "account": code.lower(),
                                   "thresholds": [80.0, 95.0, 100.0], "created_at": now,
                                   "start_date": first_day if rnd.random() < 0.7 else None,
                                   "end_date": today() + timedelta(days=rnd.randint(5, 120))})
        conn.execute(sa.insert(Allocation.__table__), alloc_rows)  # type: ignore[attr-defined]
        for aid, pid, cid, unit, start, end in conn.execute(sa.text(
                "SELECT id, project_id, cluster_id, unit, start_date, end_date FROM allocations")).all():
            code = next(c for c, i in project_ids.items() if i == pid)
            cluster = next(n for n, i in clusters.items() if i == cid)
            h.allocs[aid] = {"project": code, "project_id": pid, "cluster": cluster, "cluster_id": cid,
                             "unit": unit, "granted": 0, "charged": 0, "reserved": 0,
                             "start": date.fromisoformat(str(start)) if start else None,
                             "end": date.fromisoformat(str(end)) if end else None,
                             "members": rnd.sample(sorted(user_ids), rnd.randint(2, 6))}
        conn.execute(sa.insert(Membership.__table__), [  # type: ignore[attr-defined]
            {"project_id": a["project_id"], "user_id": user_ids[u], "role": "member", "created_at": now}
            for a in {a["project"]: a for a in h.allocs.values()}.values() for u in a["members"]])

        entries: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []
        imported: list[dict[str, Any]] = []
        aids = sorted(h.allocs)
        for aid in aids:
            a = h.allocs[aid]
            amount = rnd.randint(5_000, 50_000) * M
            a["granted"] += amount
            entries.append(_entry(aid, a, "grant", amount, None, None, "qm", now, first_day))
            if rnd.random() < 0.3:
                delta = rnd.randint(1_000, 10_000) * M
                a["granted"] += delta
                entries.append(_entry(aid, a, "adjust", delta, None, None, "qm", now, first_day))
        for i in range(charges):
            aid = rnd.choice(aids)
            a = h.allocs[aid]
            user = rnd.choice(a["members"])
            # skewed towards recent days so burn rates are not trivial
            at = now - timedelta(seconds=int(365 * 86400 * rnd.random() ** 1.6))
            amount = rnd.randint(1, 2_000_000)
            part = rnd.choice(["cpu", "gpu", "large"])
            a["charged"] += amount
            if i % 10 == 0:  # a job from accounting, not submitted through the broker
                unmapped = i % 20 == 0
                iid = len(imported) + 1
                imported.append({"id": iid, "cluster_id": a["cluster_id"], "allocation_id": aid,
                                 "scheduler_job_id": str(100000 + i), "submit_time": at - timedelta(hours=1),
                                 "account": a["project"].lower(), "username": f"posix{i % 7}",
                                 "user_id": None if unmapped else user_ids[user], "partition": part,
                                 "state": "COMPLETED", "elapsed_seconds": 3600, "alloc_tres": {}, "charged": amount,
                                 "end_time": at, "created_at": now})
                e = _entry(aid, a, "import", amount, None, None if unmapped else user_ids[user], "usage-import",
                           now, at)
                e["imported_job_id"] = iid
                entries.append(e)
                h.charges.append(Charge(a["project"], aid, a["cluster"], a["unit"],
                                        f"posix{i % 7} (unmapped)" if unmapped else user, part, amount, at))
                continue
            jid = uuid.uuid4().hex
            jobs.append(_job(jid, aid, a, user_ids[user], user, part, "COMPLETED", amount, 0, at, now))
            entries.append(_entry(aid, a, "reserve", amount, jid, user_ids[user], user, now, at))
            entries.append(_entry(aid, a, "release", amount, jid, user_ids[user], "tracker", now, at))
            entries.append(_entry(aid, a, "charge", amount, jid, user_ids[user], "tracker", now, at))
            h.charges.append(Charge(a["project"], aid, a["cluster"], a["unit"], user, part, amount, at))
        for aid in aids[::3]:  # live jobs hold reservations
            a = h.allocs[aid]
            user = a["members"][0]
            jid = uuid.uuid4().hex
            amount = rnd.randint(1, 5) * M
            a["reserved"] += amount
            jobs.append(_job(jid, aid, a, user_ids[user], user, "gpu", "RUNNING", None, amount, None, now))
            entries.append(_entry(aid, a, "reserve", amount, jid, user_ids[user], user, now, now))
        conn.execute(sa.insert(Job.__table__), jobs)  # type: ignore[attr-defined]
        if imported:
            conn.execute(sa.insert(ImportedJob.__table__), imported)  # type: ignore[attr-defined]
        conn.execute(sa.insert(LedgerEntry.__table__), entries)  # type: ignore[attr-defined]
        for aid, a in h.allocs.items():
            conn.execute(sa.text("UPDATE allocations SET granted = :g, charged = :c, reserved = :r WHERE id = :i"),
                         {"g": a["granted"], "c": a["charged"], "r": a["reserved"], "i": aid})
    return h


def _entry(aid: int, a: dict[str, Any], kind: str, amount: int, job_id: str | None, user_id: int | None,
           actor: str, now: datetime, at: datetime | date) -> dict[str, Any]:
    occurred = at if isinstance(at, datetime) else datetime.combine(at, datetime.min.time(), UTC)
    return {"allocation_id": aid, "project_id": a["project_id"], "kind": kind, "amount": amount, "job_id": job_id,
            "imported_job_id": None, "user_id": user_id, "actor": actor, "reason": "generated",
            "created_at": occurred if kind in ("grant", "adjust") else now, "occurred_at": occurred}


def _job(jid: str, aid: int, a: dict[str, Any], uid: int, user: str, part: str, state: str, charged: int | None,
         reserved: int, ended: datetime | None, now: datetime) -> dict[str, Any]:
    return {"id": jid, "project_id": a["project_id"], "cluster_id": a["cluster_id"], "user_id": uid,
            "allocation_id": aid, "name": "gen", "partition": part, "request": {}, "username": user,
            "account": a["project"].lower(), "state": state, "unit": a["unit"], "estimated": charged or reserved,
            "reserved": reserved, "charged": charged, "alloc_tres": {}, "created_at": now,
            "ended_at": ended, "settled_at": ended}


def _expected(h: History, keys: list[str], start: date | None = None, end: date | None = None,
              projects: set[str] | None = None) -> dict[tuple[str, ...], tuple[int, int]]:
    out: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0])
    for c in h.charges:
        d = c.at.date()
        if (start and d < start) or (end and d > end) or (projects and c.project not in projects):
            continue
        values = {"project": c.project, "user": c.user, "cluster": c.cluster, "partition": c.partition,
                  "day": d.isoformat(), "month": d.strftime("%Y-%m")}
        k = (*(values[x] for x in ["project", *keys]), c.unit)
        out[k][0] += c.amount
        out[k][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _got(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple[str, ...], tuple[int, int]]:
    return {(*(r[x] for x in ["project", *keys]), r["unit"]): (round(r["amount"] * M), r["jobs"]) for r in rows}


def _record(name: str, value: Any) -> None:
    out = ROOT / "test-artifacts" / "measurements.json"
    out.parent.mkdir(exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[name] = value
    out.write_text(json.dumps(data, indent=2, sort_keys=True))


def test_usage_reports_match_an_independent_computation(history_env: tuple[BrokerEnv, History]) -> None:
    env, h = history_env
    dialect = env.engine.dialect.name
    with session_scope(env.engine) as s:
        assert ledger.check(s) == [], "the generated history is consistent"
    timings: dict[str, float] = {}

    # every project, every grouping, whole history and a range that cuts months
    start, end = today() - timedelta(days=200), today() - timedelta(days=20)
    for keys in (["user"], ["cluster", "partition"], ["month"], ["user", "day"], ["user", "cluster", "partition",
                                                                                   "month"]):
        t0 = time.perf_counter()
        r = env.call("GET", "/v1/usage/report", env.qm, params={"group_by": ",".join(keys)})
        timings[f"report_all_{'_'.join(keys)}"] = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        assert _got(r.json()["rows"], keys) == _expected(h, keys)
        r = env.call("GET", "/v1/usage/report", env.qm, params={
            "group_by": ",".join(keys), "from": start.isoformat(), "to": end.isoformat()})
        assert _got(r.json()["rows"], keys) == _expected(h, keys, start, end)

    # per project, through the member-visible endpoint, JSON and CSV
    for code in sorted({a["project"] for a in h.allocs.values()})[:5]:
        t0 = time.perf_counter()
        r = env.call("GET", f"/v1/projects/{code}/usage", env.qm, params={"group_by": "user,month"})
        timings.setdefault("project_user_month_max", 0.0)
        timings["project_user_month_max"] = max(timings["project_user_month_max"], time.perf_counter() - t0)
        assert _got(r.json()["rows"], ["user", "month"]) == _expected(h, ["user", "month"], projects={code})
        csv_text = env.call("GET", f"/v1/projects/{code}/usage", env.qm,
                            params={"group_by": "user,month", "format": "csv"}).text
        lines = csv_text.strip().splitlines()
        assert lines[0] == "project,user,month,unit,amount,jobs"
        assert len(lines) - 1 == len(_expected(h, ["user", "month"], projects={code}))

    # the portfolio: balances, burn rate, projected exhaustion, under-use
    t0 = time.perf_counter()
    r = env.call("GET", "/v1/usage", env.qm, params={"window_days": 14})
    timings["portfolio"] = time.perf_counter() - t0
    rows = {row["allocation_id"]: row for row in r.json()["allocations"]}
    assert set(rows) == set(h.allocs)
    day = today()
    since = day - timedelta(days=13)
    for aid, a in h.allocs.items():
        row = rows[aid]
        assert round(row["granted"] * M) == a["granted"]
        assert round(row["used"] * M) == a["charged"]
        assert round(row["reserved"] * M) == a["reserved"]
        assert round(row["remaining"] * M) == a["granted"] - a["charged"] - a["reserved"]
        burned = sum(c.amount for c in h.charges if c.alloc == aid and since <= c.at.date() <= day)
        start_day = a["start"] or day - timedelta(days=365)  # else the project's start date
        existed = min(14, max(1, (day - start_day).days + 1))
        assert abs(row["burn_rate_per_day"] * M - burned / existed) <= 1
        remaining = a["granted"] - a["charged"] - a["reserved"]
        end_day = a["end"]
        if burned and remaining > 0:
            days_needed = remaining / (burned / existed)
            if days_needed < (end_day - day).days:
                expected_day = day + timedelta(days=int(days_needed))
                assert row["projected_exhaustion"] == expected_day.isoformat()
            else:  # a projection at or past the end: "not before the end", no date
                assert (row["projected_exhaustion"], row["forecast"]) == (None, "not_before_end")
        elapsed = (day - start_day).days / (end_day - start_day).days if end_day > start_day else None
        if elapsed is not None:
            elapsed = min(1.0, max(0.0, elapsed))
            assert row["underused"] == (elapsed >= 0.25 and a["charged"] / a["granted"] < 0.5 * elapsed)
        assert row["days_left"] == (end_day - day).days
    timings["usage_entries"] = float(len(h.charges))
    _record(f"usage_{dialect}", {k: round(v, 4) for k, v in timings.items()})
    assert timings["report_all_user_cluster_partition_month"] < 10.0
