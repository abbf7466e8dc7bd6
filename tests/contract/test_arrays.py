"""The adapter contract for job arrays (``JobSpec.array``), on every target.

An array is ONE scheduler job: ``submit`` returns the array's id, ``poll`` of a ref
with ``array_tasks`` answers each task as ``<array id>_<task>`` (``array_task_id``
set), the ``%max`` throttle is respected, every task is accounted once (its own
``usage`` record naming the array), ``cancel`` of ``<id>_<task>`` ends one task
and of ``<id>`` the whole array. The arrays are submitted together at module start.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.adapter import AdapterError, JobSpec, JobState, JobStatus, SchedulerJobRef, SubmitRejected
from tests.contract.target import ContractTarget

RUN_TASKS = (0, 1, 2, 3)
CANCEL_TASKS = (0, 1, 2)
TIME_LIMIT = 5


@dataclass
class Arrays:
    target: ContractTarget
    since: datetime
    refs: dict[str, SchedulerJobRef] = field(default_factory=dict)
    specs: dict[str, JobSpec] = field(default_factory=dict)

    def poll(self, key: str) -> dict[int, JobStatus]:
        statuses = self.target.adapter.poll([self.refs[key]])
        out = {}
        for s in statuses:
            assert s.array_task_id is not None, s
            assert s.job_id == f"{self.refs[key].job_id}_{s.array_task_id}", s
            out[s.array_task_id] = s
        return out


def _interval(target: ContractTarget) -> float:
    return max(0.05, min(1.0, target.settle_timeout / 100))


def _spec(target: ContractTarget, name: str, script: str, array: str, minutes: int = TIME_LIMIT) -> JobSpec:
    return JobSpec(tag=uuid.uuid4().hex, username=target.username, account=target.account, script=script,
                   time_limit_minutes=minutes, name=f"contract-{name}", partition=target.cpu_partition,
                   array=array)


@pytest.fixture(scope="module")
def arrays(target: ContractTarget) -> Iterator[Arrays]:
    made = Arrays(target=target, since=datetime.now(UTC) - timedelta(minutes=5))
    specs = {
        "run": _spec(target, "array-run", "#!/bin/sh\necho task $SLURM_ARRAY_TASK_ID\nsleep 3\n", "0-3%2"),
        "cancel": _spec(target, "array-cancel", "#!/bin/sh\nsleep 600\n", "0-2%2", minutes=60),
    }
    try:
        for key, spec in specs.items():
            made.specs[key] = spec
            try:
                ref = target.adapter.submit(spec)
            except SubmitRejected as exc:  # an adapter may refuse arrays (clearly), never drop them
                if exc.code in ("unsupported_directive", "unsupported_request"):
                    pytest.skip(f"the adapter refuses job arrays: {exc}")
                raise
            made.refs[key] = replace(ref, array_tasks=RUN_TASKS if key == "run" else CANCEL_TASKS)
        yield made
    finally:
        for ref in made.refs.values():
            with contextlib.suppress(AdapterError):
                target.adapter.cancel(replace(ref, array_tasks=None))


def test_array_runs_throttled_each_task_accounted_once(arrays: Arrays, target: ContractTarget) -> None:
    deadline = time.monotonic() + target.settle_timeout * 2
    most_running = 0
    seen: dict[int, JobStatus] = {}
    while time.monotonic() < deadline:
        seen = arrays.poll("run")
        running = sum(1 for s in seen.values() if s.state is JobState.RUNNING)
        most_running = max(most_running, running)
        if len(seen) == len(RUN_TASKS) and all(s.final for s in seen.values()):
            break
        time.sleep(_interval(target))
    assert set(seen) == set(RUN_TASKS), f"tasks reported: {sorted(seen)}"
    assert all(s.final for s in seen.values()), seen
    # polls only sample (a loaded host may see none running): the upper bound here,
    # the exact figure from the accounting records' start/end below
    assert most_running <= 2, f"{most_running} tasks ran at once under %2"
    for task, status in seen.items():
        assert status.state is JobState.COMPLETED and status.exit_code == 0, status
        assert status.elapsed_seconds is not None and 0 <= status.elapsed_seconds <= TIME_LIMIT * 60
        # what the broker reserves per task (1 node, 1 CPU, the time limit) covers the allocation
        assert status.alloc_tres.get("cpu") == 1 and status.alloc_tres.get("node", 1) == 1, (task, status)
    array_id = arrays.refs["run"].job_id
    if target.run_on_cluster is not None:  # the scheduler's own accounting: one record per task
        out = target.run_on_cluster(["sacct", "-X", "-n", "-P", f"-j{array_id}", "-oJobID,State"])
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        assert sorted(r[0] for r in rows) == [f"{array_id}_{t}" for t in RUN_TASKS], out
    records: dict[int, object] = {}
    deadline = time.monotonic() + target.settle_timeout
    while time.monotonic() < deadline:
        records = {r.array_task_id: r for r in target.adapter.usage(arrays.since, accounts=[target.account])
                   if r.array_job_id == array_id and r.array_task_id is not None}
        if set(records) == set(RUN_TASKS):
            break
        time.sleep(_interval(target))
    assert set(records) == set(RUN_TASKS), f"usage records of the array's tasks: {sorted(records)}"
    overlap = _most_at_once([(r.start_time, r.end_time) for r in records.values()])  # type: ignore[attr-defined]
    assert 1 <= overlap <= 2, f"{overlap} tasks ran at once under %2 (accounting start/end)"


def _most_at_once(spans: list[tuple[datetime | None, datetime | None]]) -> int:
    """The most half-open [start, end) spans covering one instant (times are whole
    seconds in Slurm: a task started when another ended does not overlap it)."""
    assert all(start is not None and end is not None for start, end in spans), spans
    edges = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])  # ends first
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def test_array_output_per_task(arrays: Arrays, target: ContractTarget) -> None:
    ref = arrays.refs["run"]
    deadline = time.monotonic() + target.settle_timeout * 2
    while time.monotonic() < deadline and not all(s.final for s in arrays.poll("run").values()):
        time.sleep(_interval(target))
    try:
        out = target.adapter.read_output(replace(ref, job_id=f"{ref.job_id}_2"), "stdout")
    except AdapterError as exc:
        if exc.code == "output_unavailable":
            pytest.skip(f"adapter cannot read output: {exc}")
        raise
    assert out.strip() == "task 2"


def test_find_by_tag_gives_the_array(arrays: Arrays, target: ContractTarget) -> None:
    found = target.adapter.find_by_tag([arrays.specs["run"].tag], since=arrays.since)
    assert found[arrays.specs["run"].tag].job_id == arrays.refs["run"].job_id


def test_cancel_one_task_then_the_whole_array(arrays: Arrays, target: ContractTarget) -> None:
    """Task 1 runs (or waits, on a busy shared cluster), task 2 waits behind ``%2``.
    A task cancelled while it waits may vanish: Slurm drops it from the array's
    pending record and keeps no accounting of it (the broker ends it itself, see
    broker.services.arrays.vanished_after_cancel); one that ran is CANCELLED."""
    ref = arrays.refs["cancel"]
    deadline = time.monotonic() + target.settle_timeout
    while time.monotonic() < deadline:
        seen = arrays.poll("cancel")
        if set(seen) == set(CANCEL_TASKS) and all(s.state in (JobState.RUNNING, JobState.PENDING)
                                                  for s in seen.values()):
            break
        time.sleep(_interval(target))
    else:
        raise AssertionError(f"the tasks were never all reported: {seen}")
    cancelled = []
    for task in (2, 1):
        try:
            target.adapter.cancel(replace(ref, job_id=f"{ref.job_id}_{task}", array_tasks=None))
        except AdapterError as exc:
            # pyslurm addresses jobs by number only and a waiting task has none of its
            # own: it may refuse (clearly, cancelling nothing) — only a waiting task
            assert exc.code == "task_not_started" and not exc.transient, exc
            assert seen[task].state is JobState.PENDING, (task, seen)
            continue
        cancelled.append(task)
    deadline = time.monotonic() + target.settle_timeout
    while time.monotonic() < deadline:
        seen = arrays.poll("cancel")
        if all(t not in seen or _ended(seen[t]) for t in cancelled):
            break
        time.sleep(_interval(target))
    for task in cancelled:
        assert task not in seen or (_ended(seen[task]) and seen[task].state is JobState.CANCELLED), seen
    assert 0 in seen and not seen[0].final, f"cancelling tasks 1 and 2 ended task 0: {seen}"
    target.adapter.cancel(replace(ref, array_tasks=None))
    deadline = time.monotonic() + target.settle_timeout
    while time.monotonic() < deadline:
        seen = arrays.poll("cancel")
        if 0 in seen and all(_ended(s) for s in seen.values()):
            break
        time.sleep(_interval(target))
    assert {s.state for s in seen.values()} == {JobState.CANCELLED}, seen
    assert all(_ended(s) for s in seen.values()), seen


def _ended(status: JobStatus) -> bool:
    """Final — or cancelled before it ever ran: slurmdb's time-window query (slurm_rest)
    does not return a never-eligible array record, so such a task stays unconfirmed;
    the broker ends it itself after the cancel (broker.services.arrays)."""
    return status.final or (status.state is JobState.CANCELLED and not status.elapsed_seconds
                            and not status.alloc_tres)
