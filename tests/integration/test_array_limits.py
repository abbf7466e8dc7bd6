"""The per-user / per-project active-job limits count array tasks as Slurm's own job
limits (MaxJobs, MaxSubmitJobs) do: each task of an active array that has not ended
is one job, and a submission of N tasks is refused when the active count + N would
exceed the limit (issue 8). On SQLite and PostgreSQL.

The tracker is off: tasks end through :func:`broker.services.settlement.settle_tasks`,
as the tracker ends them, at the moment the test chooses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, col, select

from broker.adapter import JobStatus
from broker.models import Cluster, Job, JobTask
from broker.services import ledger, settlement
from broker.states import JobState
from tests.support.env import BrokerEnv, broker_env

PROJECT = "EHPC-TEST-001"
LIMITS = {"playground": {"max_concurrent_jobs_per_user": 4, "max_concurrent_jobs_per_project": 6}}


@pytest.fixture
def limited(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    with broker_env(tmp_path, db_url, run_tracker=False, access_modes=LIMITS) as e:
        e.setup_project(members=("alice", "bob"))
        yield e


def _submit(env: BrokerEnv, who: str, array: str | None = None) -> Any:
    body: dict[str, Any] = {"project": PROJECT, "script": "#!/bin/sh\ntrue\n", "time_limit_minutes": 5}
    if array is not None:
        body["array"] = array
    return env.call("POST", "/v1/jobs", env.auth(who), json=body)


def _accepted(env: BrokerEnv, who: str, array: str | None = None) -> str:
    r = _submit(env, who, array)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _refused(env: BrokerEnv, who: str, array: str | None = None) -> str:
    r = _submit(env, who, array)
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "limit_exceeded", r.text
    return str(r.json()["detail"])


def _end_tasks(env: BrokerEnv, job_id: str, tasks: list[int]) -> None:
    """End ``tasks`` of the array as the tracker does (settled from accounting); the
    job row stays active until the tracker's next refresh."""
    with Session(env.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        cluster = session.get(Cluster, job.cluster_id)
        assert cluster is not None
        for task in session.exec(select(JobTask).where(JobTask.job_id == job_id,
                                                       col(JobTask.task).in_(tasks))).all():
            status = JobStatus(job_id=f"{job.scheduler_job_id}_{task.task}", state=JobState.COMPLETED,
                               raw_state="COMPLETED", final=True, exit_code=0, elapsed_seconds=1,
                               alloc_tres={"cpu": 1}, array_task_id=task.task)
            assert settlement.settle_tasks(session, job=job, done=[(task.id or 0, status)], cost_model=cluster.cost_model) == 1
        session.commit()
        assert ledger.check(session) == []


def _job_state(env: BrokerEnv, job_id: str) -> str:
    with env.engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT state FROM jobs WHERE id = :j"), {"j": job_id}).scalar_one())


def test_active_array_tasks_count_one_by_one_against_the_user_limit(limited: BrokerEnv) -> None:
    env = limited
    first = _accepted(env, "alice", "0-2")  # 3 pending tasks: 3 of alice's 4
    assert _job_state(env, first) == "PENDING"
    detail = _refused(env, "alice", "0-1")  # 3 + 2 > 4 (counted as one job, it was accepted)
    assert "3 active jobs" in detail and "each array task" in detail and "adds 2 tasks" in detail, detail
    est = env.call("POST", "/v1/jobs/estimate", env.auth("alice"),
                   json={"project": PROJECT, "script": "#!/bin/sh\ntrue\n", "time_limit_minutes": 5,
                         "array": "0-1"}).json()
    assert [d["code"] for d in est["denials"]] == ["limit_exceeded"], est
    _end_tasks(env, first, [0, 1])  # 1 task left
    assert _job_state(env, first) == "PENDING"
    second = _accepted(env, "alice", "0-1")  # 1 + 2 <= 4
    _refused(env, "alice", "0-1")  # 3 + 2 > 4
    _end_tasks(env, first, [2])  # every task of the first array ended, its row not yet refreshed: 0
    assert _job_state(env, first) == "PENDING"
    _accepted(env, "alice")  # 2 (second) + 1 <= 4
    _accepted(env, "alice")  # 3 + 1 <= 4
    # a plain job once the limit is reached: refused exactly as before arrays counted
    detail = _refused(env, "alice")
    assert "4 active jobs" in detail and "adds" not in detail, detail
    _end_tasks(env, second, [0])
    _accepted(env, "alice")  # 3 + 1 <= 4


def test_the_project_limit_counts_every_members_tasks(limited: BrokerEnv) -> None:
    env = limited
    first = _accepted(env, "alice", "0-3")  # 4 tasks: alice at her limit, the project at 4 of 6
    _refused(env, "alice")
    detail = _refused(env, "bob", "0-2")  # 4 + 3 > 6
    assert detail.startswith(f"Project {PROJECT} already has 4 active jobs") and "adds 3 tasks" in detail, detail
    second = _accepted(env, "bob", "0-1")  # 4 + 2 <= 6
    _refused(env, "bob")  # 6: the project is full
    _end_tasks(env, first, [0, 1, 2, 3])
    _end_tasks(env, second, [0, 1])
    # an array larger than the limit by itself is refused even with nothing active
    assert "0 active jobs" in _refused(env, "alice", "0-4")
    _accepted(env, "alice", "0-3")
