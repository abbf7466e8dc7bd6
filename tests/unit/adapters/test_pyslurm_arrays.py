"""pyslurm adapter: job arrays, beyond the shared contract (tests/contract/test_arrays.py).

Against the pyslurm 25.11 stand-in only (no live libslurm here): a started task is
a record of its own job id, the waiting tasks one record under the array's id
(``array_tasks_waiting`` as ranges from slurmctld, as a hex bitmap from
slurmdbd), the last task to start takes over the array's own id, and the array's
id cancels the whole array."""

from __future__ import annotations

import getpass
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import SimpleNamespace

import pytest

from adapters.pyslurm_adapter import PySlurmAdapter, _by_key, _parse_key, _record_keys
from broker.adapter import AdapterError, JobSpec, JobState, JobStatus, SchedulerJobRef
from tests.contract.factory_pyslurm import make_pyslurm_target


@pytest.fixture
def adapter() -> Iterator[PySlurmAdapter]:
    target = make_pyslurm_target()
    assert isinstance(target.adapter, PySlurmAdapter)
    try:
        yield target.adapter
    finally:
        target.adapter.close()


def _submit(adapter: PySlurmAdapter, array: str, script: str = "#!/bin/sh\nsleep 30\n") -> SchedulerJobRef:
    spec = JobSpec(tag=uuid.uuid4().hex, username=getpass.getuser(), account="proj-a", script=script,
                   time_limit_minutes=60, partition="cpu", array=array)
    return adapter.submit(spec)


def _until(adapter: PySlurmAdapter, ref: SchedulerJobRef, done: Callable[[dict[int, JobStatus]], bool],
           timeout: float = 15.0) -> dict[int, JobStatus]:
    deadline = time.monotonic() + timeout
    while True:
        seen = {s.array_task_id: s for s in adapter.poll([ref]) if s.array_task_id is not None}
        if done(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {seen}")
        time.sleep(0.05)


def test_records_are_named_as_the_broker_names_tasks() -> None:
    task = SimpleNamespace(id=1005, array_id=1004, array_task_id=3)
    queue_waiting = SimpleNamespace(id=1004, array_id=1004, array_task_id=None, array_tasks_waiting="2,4-5")
    db_waiting = SimpleNamespace(id=1004, array_id=1004, array_task_id=None, array_tasks_waiting="0x3C")
    plain = SimpleNamespace(id=77, array_id=None, array_task_id=None)
    assert _record_keys(task) == ["1004_3"]
    assert _record_keys(queue_waiting) == ["1004_2", "1004_4", "1004_5"]
    assert _record_keys(db_waiting) == ["1004_2", "1004_3", "1004_4", "1004_5"]
    assert _record_keys(plain) == ["77"]
    assert (_parse_key("7"), _parse_key("7_3")) == ((7, None), (7, 3))
    for bad in ("7_", "x", "7_x", "_3", "7_3_1"):
        with pytest.raises(AdapterError):
            _parse_key(bad)


def test_a_tasks_own_record_wins_over_the_waiting_record() -> None:
    """Should slurmdbd still list a started task among the waiting ones, the task's
    own record answers for it (same submit time: the tasks inherit the array's)."""
    waiting = SimpleNamespace(id=1004, array_id=1004, array_task_id=None, array_tasks_waiting="0x6",
                              submit_time=100, state="PENDING")
    task = SimpleNamespace(id=1006, array_id=1004, array_task_id=1, submit_time=100, state="COMPLETED")
    other = SimpleNamespace(id=1007, array_id=1005, array_task_id=0, submit_time=100, state="RUNNING")
    for order in ([waiting, task, other], [task, waiting, other]):
        found = _by_key(order, {1004})
        assert found == {"1004_1": task, "1004_2": waiting}


def test_submit_passes_the_array_to_libslurm() -> None:
    from tests.contract import pyslurm_standin

    desc = PySlurmAdapter("c", {}, data_dir="/nonexistent", api=pyslurm_standin)._description(
        JobSpec(tag="a" * 32, username=getpass.getuser(), account="p", script="true", time_limit_minutes=5,
                array="0-15:2%4"))
    assert desc["array"] == "0-15:2%4"


def test_waiting_task_cannot_be_cancelled_alone_and_nothing_else_is(adapter: PySlurmAdapter) -> None:
    ref = _submit(adapter, "0-2%1")
    tracked = replace(ref, array_tasks=(0, 1, 2))
    seen = _until(adapter, tracked, lambda s: s.get(0) is not None and s[0].state is JobState.RUNNING)
    assert seen[1].state is JobState.PENDING and seen[1].reason == "JobArrayTaskLimit", seen
    with pytest.raises(AdapterError) as exc:
        adapter.cancel(replace(ref, job_id=f"{ref.job_id}_2"))
    assert exc.value.code == "task_not_started" and not exc.value.transient
    with pytest.raises(AdapterError) as out:
        adapter.read_output(replace(ref, job_id=f"{ref.job_id}_2"))
    assert out.value.code == "output_unavailable"
    seen = _until(adapter, tracked, lambda s: len(s) == 3)
    assert seen[0].state is JobState.RUNNING and {seen[1].state, seen[2].state} == {JobState.PENDING}
    # the whole array: the waiting tasks' record and the running task, all accounted as cancelled
    adapter.cancel(replace(ref, array_tasks=None))
    seen = _until(adapter, tracked, lambda s: len(s) == 3 and all(x.final for x in s.values()))
    assert {x.state for x in seen.values()} == {JobState.CANCELLED}
    assert not seen[1].elapsed_seconds and not seen[1].alloc_tres  # never ran: nothing to charge


def test_the_last_task_runs_under_the_arrays_id_and_is_not_cancelled_by_it(adapter: PySlurmAdapter) -> None:
    """Both tasks start at once: task 0 gets a new job id, task 1 takes over the
    array's own id — which would cancel the whole array, so cancelling task 1 alone
    is refused while task 0 lives, and allowed once it is the array's last task."""
    ref = _submit(adapter, "0-1")
    tracked = replace(ref, array_tasks=(0, 1))
    _until(adapter, tracked, lambda s: len(s) == 2 and all(x.state is JobState.RUNNING for x in s.values()))
    with pytest.raises(AdapterError) as exc:
        adapter.cancel(replace(ref, job_id=f"{ref.job_id}_1"))
    assert exc.value.code == "task_not_addressable"
    adapter.cancel(replace(ref, job_id=f"{ref.job_id}_0"))
    seen = _until(adapter, tracked, lambda s: s[0].final)
    assert seen[0].state is JobState.CANCELLED and seen[1].state is JobState.RUNNING, seen
    adapter.cancel(replace(ref, job_id=f"{ref.job_id}_1"))
    seen = _until(adapter, tracked, lambda s: s[1].final)
    assert seen[1].state is JobState.CANCELLED


def test_usage_names_each_task_and_its_array(adapter: PySlurmAdapter) -> None:
    from datetime import UTC, datetime, timedelta

    since = datetime.now(UTC) - timedelta(minutes=1)
    ref = _submit(adapter, "3,5", script="#!/bin/sh\necho $SLURM_ARRAY_TASK_ID\n")
    _until(adapter, replace(ref, array_tasks=(3, 5)), lambda s: len(s) == 2 and all(x.final for x in s.values()))
    records = [r for r in adapter.usage(since) if r.array_job_id == ref.job_id]
    assert sorted((r.array_task_id, r.state) for r in records) == [(3, JobState.COMPLETED), (5, JobState.COMPLETED)]
    assert len({r.job_id for r in records}) == 2  # each task accounted under its own job id
    assert adapter.read_output(replace(ref, job_id=f"{ref.job_id}_5")).strip() == "5"
