"""An array job's state from its tasks', and its reservation split over them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.adapter import JobState, JobStatus
from broker.models import JobTask, utcnow
from broker.services.arrays import aggregate_state, shares, vanished_after_cancel


@pytest.mark.parametrize(("states", "whole"), [
    (["PENDING", "PENDING"], "PENDING"),
    (["COMPLETED", "PENDING"], "PENDING"),  # between tasks (e.g. %max): waiting, as Slurm shows it
    (["RUNNING", "PENDING", "COMPLETED"], "RUNNING"),
    (["COMPLETING", "COMPLETED"], "RUNNING"),
    (["COMPLETED", "COMPLETED"], "COMPLETED"),
    (["COMPLETED", "FAILED", "CANCELLED"], "FAILED"),
    (["COMPLETED", "TIMEOUT", "CANCELLED"], "TIMEOUT"),
    (["COMPLETED", "CANCELLED"], "CANCELLED"),
    (["SUBMIT_FAILED", "SUBMIT_FAILED"], "SUBMIT_FAILED"),
    (["ACCEPTED", "ACCEPTED"], "ACCEPTED"),
])
def test_aggregate_state(states: list[str], whole: str) -> None:
    assert aggregate_state(states) == JobState(whole)


@pytest.mark.parametrize(("total", "count"), [(10, 3), (7, 7), (0, 4), (10**15 + 7, 9999), (5, 10)])
def test_shares_add_up_exactly(total: int, count: int) -> None:
    parts = shares(total, count)
    assert len(parts) == count and sum(parts) == total and max(parts) - min(parts) <= 1


def test_a_task_cancelled_before_it_started_ends_only_after_the_grace() -> None:
    asked = utcnow() - timedelta(seconds=30)
    waiting = JobTask(job_id="j", task=2, cancel_requested_at=asked)
    assert vanished_after_cancel(waiting, None, key="7_2", now=asked + timedelta(seconds=5), grace_seconds=60) is None
    gone = vanished_after_cancel(waiting, None, key="7_2", now=asked + timedelta(seconds=61), grace_seconds=60)
    assert gone is not None and gone.final and gone.state is JobState.CANCELLED and gone.elapsed_seconds == 0
    later = asked + timedelta(seconds=61)
    unconfirmed = JobStatus(job_id="7_2", state=JobState.CANCELLED, raw_state="CANCELLED", elapsed_seconds=0)
    assert vanished_after_cancel(waiting, unconfirmed, key="7_2", now=later, grace_seconds=60) is not None
    # still alive, or it used something (accounting will settle it), or no cancel was asked
    alive = JobStatus(job_id="7_2", state=JobState.PENDING, raw_state="PENDING")
    used = JobStatus(job_id="7_2", state=JobState.CANCELLED, raw_state="CANCELLED", elapsed_seconds=3,
                     alloc_tres={"cpu": 1})
    for status in (alive, used):
        assert vanished_after_cancel(waiting, status, key="7_2", now=later, grace_seconds=60) is None
    assert vanished_after_cancel(JobTask(job_id="j", task=2), None, key="7_2", now=later, grace_seconds=60) is None
    ran = JobTask(job_id="j", task=2, cancel_requested_at=asked, started_at=asked)
    assert vanished_after_cancel(ran, None, key="7_2", now=later, grace_seconds=60) is None
