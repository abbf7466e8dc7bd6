"""A polling cycle's ended jobs settled together (broker/services/settlement.settle_ended):
each job charged exactly once — also when the batch is repeated, when two replicas
settle the same jobs at once, and when one job of the batch cannot be settled."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import select

from broker.adapter import JobState, JobStatus
from broker.db import session_scope
from broker.models import Allocation, Cluster, Job, JobEvent, LedgerEntry, Notification
from broker.services import ledger, settlement
from tests.support.concurrency import race_replicas
from tests.support.env import BrokerEnv, broker_env
from tests.support.jobs import seed_live_jobs

END = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture
def quiet_env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    """A broker without its tracker thread: the tests settle by hand."""
    with broker_env(tmp_path, db_url, run_tracker=False) as e:
        yield e


def _running_jobs(env: BrokerEnv, n: int) -> list[str]:
    """``n`` RUNNING jobs on the local cluster, each with its reservation (as submitted)."""
    env.setup_project(amount=1000.0)
    return seed_live_jobs(env.engine, n, state="RUNNING", partition="cpu", unit="core_hours", reserved=10_000_000,
                          first_scheduler_id=500, submitted_at=END - timedelta(hours=2))


def _completed(job_id: str) -> tuple[str, JobStatus]:
    # one CPU but half a node's memory for an hour: the memory rule prices it as 8 CPUs
    return job_id, JobStatus(job_id="x", state=JobState.COMPLETED, raw_state="COMPLETED", final=True, exit_code=0,
                             start_time=END - timedelta(hours=1), end_time=END, elapsed_seconds=3600,
                             alloc_tres={"cpu": 1, "mem": 32768, "node": 1})


def _settle(env: BrokerEnv, ended: list[tuple[str, JobStatus]]) -> list[str]:
    with session_scope(env.engine) as s:
        cluster = s.exec(select(Cluster).where(Cluster.name == "local")).one()
        return settlement.settle_ended(s, ended, cluster=cluster)


def _ledger_rows(env: BrokerEnv, kind: str) -> list[LedgerEntry]:
    with session_scope(env.engine) as s:
        return list(s.exec(select(LedgerEntry).where(LedgerEntry.kind == kind)).all())


def test_a_batch_settles_each_job_once_with_its_events_and_balances(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    ids = _running_jobs(env, 5)
    ended = [_completed(i) for i in ids]
    assert sorted(_settle(env, ended)) == sorted(ids)
    assert _settle(env, ended) == []  # a second cycle seeing the same ends settles nothing
    charges, releases = _ledger_rows(env, "charge"), _ledger_rows(env, "release")
    assert sorted(e.job_id for e in charges) == sorted(ids) == sorted(e.job_id for e in releases)  # type: ignore[type-var]
    assert {e.amount for e in charges} == {8_000_000} and {e.amount for e in releases} == {10_000_000}
    assert {e.occurred_at.replace(tzinfo=UTC) for e in charges} == {END}
    with session_scope(env.engine) as s:
        assert ledger.check(s) == []
        alloc = s.exec(select(Allocation)).one()
        assert (alloc.reserved, alloc.charged) == (0, 5 * 8_000_000)
        jobs = s.exec(select(Job)).all()
        assert {(j.state, j.charged, j.reserved, j.exit_code) for j in jobs} == {("COMPLETED", 8_000_000, 0, 0)}
        assert all(j.settled_at is not None for j in jobs)
        events = s.exec(select(JobEvent).where(JobEvent.state == "COMPLETED")).all()
        assert sorted((e.job_id, e.previous_state) for e in events) == sorted((i, "RUNNING") for i in ids)


def test_a_threshold_reached_by_a_batch_is_recorded_once(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    ids = _running_jobs(env, 4)
    with session_scope(env.engine) as s:  # 1000 core hours: 2 jobs × 8 reach 1.6 %, 4 jobs 3.2 %
        s.execute(sa.update(Allocation).values(thresholds=[1.0, 3.0, 50.0]))
    _settle(env, [_completed(i) for i in ids[:2]])
    _settle(env, [_completed(i) for i in ids[2:]])
    with session_scope(env.engine) as s:
        levels = sorted(n.level for n in s.exec(select(Notification).where(Notification.kind == "threshold")))
    assert levels == [1.0, 3.0]


def test_two_replicas_settling_the_same_jobs_charge_each_once(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    ids = _running_jobs(env, 30)
    ended = [_completed(i) for i in ids]

    def replica(engine: sa.Engine) -> list[str]:
        with session_scope(engine) as s:
            cluster = s.exec(select(Cluster).where(Cluster.name == "local")).one()
            return settlement.settle_ended(s, ended, cluster=cluster)

    results = race_replicas(env.engine, replica)
    assert len(results) == 2
    assert sorted(results[0] + results[1]) == sorted(ids)  # every job by exactly one of them
    assert sorted(e.job_id for e in _ledger_rows(env, "charge")) == sorted(ids)  # type: ignore[type-var]
    with session_scope(env.engine) as s:
        assert ledger.check(s) == []


def test_a_job_that_cannot_be_settled_holds_back_no_other(quiet_env: BrokerEnv,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    env = quiet_env
    ids = _running_jobs(env, 4)
    bad = sorted(ids)[1]
    with session_scope(env.engine) as s:  # a charge row already there: the ledger refuses a second one
        alloc = s.exec(select(Allocation)).one()
        s.add(LedgerEntry(allocation_id=alloc.id or 0, project_id=alloc.project_id, kind="charge", amount=0,
                          job_id=bad, actor="test"))
    tracker = env.app.state.tracker
    with session_scope(env.engine) as s:
        cluster = s.exec(select(Cluster).where(Cluster.name == "local")).one()
    tracker._settle_ended(cluster, [_completed(i) for i in ids])
    with session_scope(env.engine) as s:
        unsettled = [j.id for j in s.exec(select(Job).where(Job.settled_at == None)).all()]  # noqa: E711
        assert ledger.check(s) == []
    assert unsettled == [bad]
    assert f"settling job {bad} failed" in caplog.text
