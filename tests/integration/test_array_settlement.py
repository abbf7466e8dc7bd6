"""An array's ended tasks settled together (broker/services/settlement.settle_tasks): each
task released and charged exactly once — also when a later cycle sees the same ends
again and when two replicas settle the same tasks at once — the job's and the
allocation's balances equal to the ledger's at every step. On SQLite and PostgreSQL.

The tracker is off: the tests end tasks at the moment they choose, as the tracker's
array path does (one transaction per array job and cycle)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from broker.adapter import JobStatus
from broker.db import session_scope
from broker.models import Allocation, Cluster, Job, JobTask, LedgerEntry, Notification
from broker.services import arrays, ledger, settlement
from broker.states import JobState
from tests.support.concurrency import race_replicas
from tests.support.env import BrokerEnv, broker_env

PROJECT = "EHPC-TEST-001"
END = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture
def quiet_env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    with broker_env(tmp_path, db_url, run_tracker=False) as e:
        e.setup_project(amount=1000.0)
        yield e


def _array(env: BrokerEnv, tasks: int) -> str:
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": PROJECT, "script": "#!/bin/sh\ntrue\n", "time_limit_minutes": 60, "array": f"0-{tasks - 1}"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _ended(env: BrokerEnv, job_id: str, indexes: list[int], seconds: int = 3600) -> list[tuple[int, JobStatus]]:
    """(task id, final status) of the tasks ``indexes``: one CPU for ``seconds``."""
    with session_scope(env.engine) as s:
        rows = s.exec(select(JobTask).where(JobTask.job_id == job_id, col(JobTask.task).in_(indexes))).all()
        return [(t.id or 0, JobStatus(job_id=t.scheduler_job_id or "", state=JobState.COMPLETED,
                                      raw_state="COMPLETED", final=True, exit_code=0, elapsed_seconds=seconds,
                                      start_time=END - timedelta(seconds=seconds), end_time=END,
                                      alloc_tres={"cpu": 1}, array_task_id=t.task)) for t in rows]


def _settle(engine: sa.Engine, job_id: str, done: list[tuple[int, JobStatus]]) -> int:
    with session_scope(engine) as s:
        job = s.get(Job, job_id)
        cluster = s.get(Cluster, job.cluster_id) if job else None
        assert job is not None and cluster is not None
        return settlement.settle_tasks(s, job=job, done=done, cost_model=cluster.cost_model)


def _entries(env: BrokerEnv, kind: str) -> list[LedgerEntry]:
    with session_scope(env.engine) as s:
        return list(s.exec(select(LedgerEntry).where(LedgerEntry.kind == kind)).all())


def _balances(env: BrokerEnv, job_id: str) -> tuple[int, int, int, int]:
    """(job reserved, sum of unsettled tasks' shares, allocation reserved, allocation charged)."""
    with session_scope(env.engine) as s:
        job = s.get(Job, job_id)
        alloc = s.exec(select(Allocation)).one()
        shares = sum(t.reserved for t in s.exec(select(JobTask).where(JobTask.job_id == job_id,
                                                                       col(JobTask.settled_at).is_(None))))
        assert job is not None
        assert ledger.check(s) == []
        return job.reserved, shares, alloc.reserved, alloc.charged


def test_ended_tasks_settle_once_each_with_their_shares_released(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    job_id = _array(env, 10)
    reserved_before, shares_before, alloc_reserved_before, _ = _balances(env, job_id)
    assert reserved_before == shares_before == alloc_reserved_before > 0

    assert _settle(env.engine, job_id, _ended(env, job_id, [0, 1, 2, 3, 4, 5])) == 6
    charges, releases = _entries(env, "charge"), _entries(env, "release")
    assert sorted(e.task for e in charges) == sorted(e.task for e in releases) == [0, 1, 2, 3, 4, 5]
    assert {e.amount for e in charges} == {1_000_000}  # one core hour each
    assert {e.occurred_at.replace(tzinfo=UTC) for e in charges} == {END}
    job_reserved, shares, alloc_reserved, alloc_charged = _balances(env, job_id)
    assert job_reserved == shares == alloc_reserved == reserved_before - sum(e.amount for e in releases)
    assert alloc_charged == 6_000_000

    # a later cycle sees four of the same ends again and two new ones: only the new ones settle
    assert _settle(env.engine, job_id, _ended(env, job_id, [2, 3, 4, 5, 6, 7])) == 2
    assert sorted(e.task for e in _entries(env, "charge")) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert _balances(env, job_id)[3] == 8_000_000

    assert _settle(env.engine, job_id, _ended(env, job_id, [8, 9])) == 2
    with session_scope(env.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        arrays.refresh(s, job=job)
    with session_scope(env.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.reserved, job.charged) == ("COMPLETED", 0, 10_000_000)
        assert job.settled_at is not None and job.array_counts == {"COMPLETED": 10}
    assert _balances(env, job_id)[1:] == (0, 0, 10_000_000)


def test_two_replicas_settling_the_same_tasks_charge_each_once(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    job_id = _array(env, 40)
    done = _ended(env, job_id, list(range(40)))
    counts = race_replicas(env.engine, lambda engine: _settle(engine, job_id, done))
    assert len(counts) == 2 and sum(counts) == 40  # every task by exactly one of them
    assert sorted(e.task for e in _entries(env, "charge")) == list(range(40))
    assert _balances(env, job_id)[:3] == (0, 0, 0)


def test_a_threshold_reached_by_an_array_is_recorded_once(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    job_id = _array(env, 4)
    with session_scope(env.engine) as s:  # 1000 core hours: 2 tasks reach 0.2 %, 4 tasks 0.4 %
        s.execute(sa.update(Allocation).values(thresholds=[0.1, 0.3, 50.0]))
    _settle(env.engine, job_id, _ended(env, job_id, [0, 1]))
    _settle(env.engine, job_id, _ended(env, job_id, [2, 3]))
    _settle(env.engine, job_id, _ended(env, job_id, [0, 1, 2, 3]))
    with session_scope(env.engine) as s:
        levels = sorted(n.level for n in s.exec(select(Notification).where(Notification.kind == "threshold")))
    assert levels == [0.1, 0.3]


class _Tasks:
    """Every task of every array ref in ``state`` (``odd``: task 5 in COMPLETING's word)."""

    def __init__(self, started: datetime) -> None:
        self.started, self.odd = started, False

    def poll(self, refs: list) -> list[JobStatus]:  # type: ignore[type-arg]
        out = []
        for r in refs:
            for t in r.array_tasks or ():
                ended = self.odd and t == 5
                out.append(JobStatus(job_id=f"{r.job_id}_{t}", state=JobState.COMPLETED if ended else JobState.RUNNING,
                                     raw_state="COMPLETED" if ended else "RUNNING", final=False,
                                     start_time=self.started, array_task_id=t))
        return out


def test_a_tracker_cycle_writes_only_the_tasks_that_changed(quiet_env: BrokerEnv) -> None:
    """The tracker reads live arrays' tasks as plain rows and counts them in the
    database: the first cycle writes every task that changed and the jobs' aggregate;
    a cycle where nothing changed writes no job, task or event; one changed task is
    the only task written, and the aggregate follows it."""
    from broker import direct

    env = quiet_env
    ids = [_array(env, 40), _array(env, 40)]
    with session_scope(env.engine) as s:
        cluster = s.exec(select(Cluster).where(Cluster.name == "local")).one()
    stand_in = _Tasks(END)
    tracker = env.app.state.tracker
    tracker.poll_cluster(cluster, stand_in)
    for job_id in ids:
        job = env.job(job_id, env.auth("alice"))
        assert job["state"] == "RUNNING" and job["array"]["counts"] == {"RUNNING": 40}, job
    with session_scope(env.engine) as s:
        starts = {t.started_at for t in s.exec(select(JobTask).where(col(JobTask.job_id).in_(ids)))}
    assert starts == {END}

    sent: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        sent.append(" ".join(statement.split()).upper())

    sa.event.listen(env.engine, "before_cursor_execute", record)
    direct.OBSERVERS.append(record_direct := lambda statement: record(None, None, statement))
    try:
        tracker.poll_cluster(cluster, stand_in)
        steady = [w for w in sent if w.startswith(("UPDATE JOB", "INSERT", "WITH"))]
        assert steady == [], steady
        sent.clear()
        stand_in.odd = True
        tracker.poll_cluster(cluster, stand_in)
    finally:
        sa.event.remove(env.engine, "before_cursor_execute", record)
        direct.OBSERVERS.remove(record_direct)
    assert len([w for w in sent if w.startswith("UPDATE JOB_TASKS")]) == len(ids)  # one batch per array
    with session_scope(env.engine) as s:
        changed = s.exec(select(JobTask).where(JobTask.state == "COMPLETING")).all()
    assert sorted((t.job_id, t.task) for t in changed) == sorted((j, 5) for j in ids)
    for job_id in ids:
        counts = env.job(job_id, env.auth("alice"))["array"]["counts"]
        assert counts == {"RUNNING": 39, "COMPLETING": 1}, counts
