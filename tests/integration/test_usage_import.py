"""Usage import from accounting: exactly once per (cluster, job id, submit time) and
per globally unique id (Slurm 26.05 sluid); broker jobs and bad records skipped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlmodel import select

from broker.adapter import JobState, UsageRecord
from broker.db import session_scope
from broker.models import Allocation, Cluster
from tests.support.env import BrokerEnv


def _record(job_id: str, *, global_id: str | None = None, submitted: datetime | None = None,
            account: str = "proj-a", user: str = "bob", tag: str | None = None) -> UsageRecord:
    submit = submitted or datetime.now(UTC) - timedelta(minutes=10)
    return UsageRecord(job_id=job_id, account=account, username=user, partition="gpu",
                       state=JobState.COMPLETED, raw_state="COMPLETED", submit_time=submit,
                       start_time=submit, end_time=submit + timedelta(hours=1), elapsed_seconds=3600,
                       alloc_tres={"gres/gpu": 2, "cpu": 4}, tag=tag, global_id=global_id)


def _import(env: BrokerEnv, records: list[UsageRecord]) -> int:
    tracker = env.app.state.tracker
    with session_scope(env.engine) as s:
        cluster = s.exec(select(Cluster).where(Cluster.name == "local")).one()
        allocs = list(s.exec(select(Allocation)).all())
    return sum(tracker._import_one(cluster, allocs, r) for r in records)


def _imported(env: BrokerEnv) -> list[tuple]:
    with env.engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT scheduler_job_id, global_id, charged FROM imported_jobs "
                                         "ORDER BY id")).all())


def test_each_accounting_record_is_charged_exactly_once(env: BrokerEnv) -> None:
    env.setup_project(unit="gpu_hours", members=("alice", "bob"))
    first = [_record("10"), _record("11", global_id="sAAA"), _record("12", account="other-account")]
    assert _import(env, first) == 2
    assert _import(env, first) == 0  # the next cycle sees the same records
    # job ids restarted (slurmctld state lost): same sluid is the same job, a new sluid is new
    later = datetime.now(UTC) - timedelta(minutes=5)
    assert _import(env, [_record("1", global_id="sAAA", submitted=later),
                         _record("11", global_id="sBBB", submitted=later)]) == 1
    rows = _imported(env)
    assert [(r[0], r[1]) for r in rows] == [("10", None), ("11", "sAAA"), ("11", "sBBB")]
    assert all(r[2] == 2_000_000 for r in rows)  # 2 GPUs × 1 h
    usage = env.call("GET", "/v1/projects/EHPC-TEST-001/usage", env.auth("alice"), params={"group_by": "user"}).json()
    assert usage["rows"] == [{"project": "EHPC-TEST-001", "user": "bob", "unit": "gpu_hours", "amount": 6.0, "jobs": 3}]


def test_broker_jobs_and_unfinished_records_are_not_imported(env: BrokerEnv) -> None:
    env.setup_project(unit="gpu_hours")
    job = env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 1}).json()
    running = UsageRecord(**{**_record("20").__dict__, "state": JobState.RUNNING, "raw_state": "RUNNING"})
    assert _import(env, [_record("99", tag=job["id"]), running]) == 0
    assert _imported(env) == []
