"""What the scheduler says about a waiting job, from each adapter's records into
the job record (issue 8 point 6). The live check against Slurm is
tests/e2e/test_slurm_pending_reason.py."""

from __future__ import annotations

import types
from datetime import UTC, datetime, timedelta

from adapters.pyslurm_adapter import PySlurmAdapter
from adapters.slurm_common.queue import queue_job_from_json
from adapters.slurm_common.states import started_or_expected
from adapters.slurm_ssh.adapter import _status_from_queue
from broker.adapter import JobStatus
from broker.db import session_scope
from broker.models import Cluster, Job
from broker.states import JobState
from tests.contract import pyslurm_standin
from tests.support.env import BrokerEnv

T = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)


def test_a_pending_jobs_start_time_is_a_projection_not_a_start() -> None:
    assert started_or_expected(JobState.PENDING, T) == (None, T)
    assert started_or_expected(JobState.RUNNING, T) == (T, None)
    assert started_or_expected(JobState.PENDING, None) == (None, None)


def test_squeue_records_of_every_release_give_reason_and_expected_start() -> None:
    epoch = int(T.timestamp())
    plain = {"job_id": 7, "job_state": "PENDING", "state_reason": "Resources", "start_time": epoch}  # 22.05
    wrapped = {"job_id": 7, "job_state": ["PENDING"], "state_reason": "AssocGrpGRESMinutes",  # 23.02+
               "start_time": {"set": True, "infinite": False, "number": epoch}}
    unknown = {"job_id": 7, "job_state": ["PENDING"], "state_reason": "None",
               "start_time": {"set": True, "infinite": False, "number": 0}}
    running = {"job_id": 7, "job_state": ["RUNNING"], "state_reason": "None",
               "start_time": {"set": True, "infinite": False, "number": epoch}}
    s = _status_from_queue(queue_job_from_json(plain))
    assert (s.reason, s.expected_start, s.start_time) == ("Resources", T, None)
    s = _status_from_queue(queue_job_from_json(wrapped))
    assert (s.reason, s.expected_start, s.start_time) == ("AssocGrpGRESMinutes", T, None)
    s = _status_from_queue(queue_job_from_json(unknown))
    assert (s.reason, s.expected_start, s.start_time) == (None, None, None)
    s = _status_from_queue(queue_job_from_json(running))
    assert (s.reason, s.expected_start, s.start_time) == (None, None, T)


def test_pyslurm_jobs_give_reason_and_expected_start() -> None:
    adapter = PySlurmAdapter("c", {}, data_dir="/nonexistent", api=pyslurm_standin)
    job = types.SimpleNamespace(id=9, state="PENDING", state_reason="Priority", submit_time=0,
                                start_time=int(T.timestamp()), end_time=0, elapsed_time=0, run_time=0,
                                allocated_tres=None, name="x")
    s = adapter._status(job, accounting=False)
    assert (s.reason, s.expected_start, s.start_time) == ("Priority", T, None)
    job.state_reason = "None"
    assert adapter._status(job, accounting=False).reason is None


def _status(state: JobState, **kw: object) -> JobStatus:
    return JobStatus(job_id="1", state=state, raw_state=state.value, **kw)  # type: ignore[arg-type]


def test_tracker_keeps_the_reason_while_pending_and_clears_it_at_start(env: BrokerEnv) -> None:
    env.setup_project()
    env.app.state.tracker.stop()  # statuses are fed by hand below
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": "EHPC-TEST-001", "script": "#!/bin/sh\nsleep 30\n", "time_limit_minutes": 5})
    job_id = r.json()["id"]
    tracker = env.app.state.tracker

    def feed(status: JobStatus) -> dict:
        with session_scope(env.engine) as session:
            job = session.get(Job, job_id)
            cluster = session.get(Cluster, job.cluster_id)  # type: ignore[union-attr]
            tracker._apply_status(session, cluster, job, status)
        return env.job(job_id, env.auth("alice"))

    shown = feed(_status(JobState.PENDING, reason="Priority"))
    assert (shown["state"], shown["pending_reason"], shown["expected_start"]) == ("PENDING", "Priority", None)
    shown = feed(_status(JobState.PENDING, reason="Resources", expected_start=T))
    assert shown["pending_reason"] == "Resources" and shown["started_at"] is None
    assert datetime.fromisoformat(shown["expected_start"]) == T
    later = T + timedelta(minutes=3)
    shown = feed(_status(JobState.PENDING, reason="Resources", expected_start=later))
    assert datetime.fromisoformat(shown["expected_start"]) == later
    shown = feed(_status(JobState.RUNNING, reason=None, start_time=later))
    assert shown["state"] == "RUNNING" and shown["pending_reason"] is None and shown["expected_start"] is None
    assert datetime.fromisoformat(shown["started_at"]) == later
    env.call("DELETE", f"/v1/jobs/{job_id}", env.auth("alice"))
