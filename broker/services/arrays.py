"""Array jobs (``--array``): one broker job, one :class:`JobTask` per array index.

Why one job with tasks rather than one broker job per task: Slurm submits, queues,
throttles (``%max``) and cancels an array as one job, and the budget is reserved
for the whole array in one step (tasks × per-task estimate) — a per-task broker
job could not be reserved atomically nor submitted as one ``sbatch --array``.

Money: at submission the job's reservation is split over its tasks (shares that
add up exactly to the job's ``reserved``). When a task ends, its share is
released and its own usage (the scheduler's accounting of that task) charged:
one ``release`` and one ``charge`` ledger row per task (``ledger_entries.task``),
so the job's ``reserved`` always equals the sum of its unsettled tasks' shares
and the ledger check holds at every moment.

State of the whole job (docs/directives.md):

- not every task ended: ``RUNNING`` while any task runs (or completes), else
  ``PENDING`` (the pending reason is a waiting task's, e.g. ``JobArrayTaskLimit``);
- every task ended: ``COMPLETED`` if all completed; otherwise the "worst" end in
  the order ``FAILED`` > ``TIMEOUT`` > ``CANCELLED`` (so an array with one failed
  task is ``FAILED``); the job's ``exit_code`` is the largest of its tasks'.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from broker import events
from broker.adapter import JobStatus
from broker.directives import ArraySpec, parse_array
from broker.metrics import SETTLEMENTS
from broker.models import Job, JobTask, utcnow
from broker.schemas import ArrayOut, JobTaskOut, Money
from broker.services.common import to_units
from broker.states import TERMINAL_STATES, JobState

__all__ = [
    "aggregate_state",
    "array_out",
    "array_spec",
    "create_tasks",
    "finish_if_done",
    "initial_counts",
    "is_array",
    "mark_submitted",
    "note_cancel",
    "refresh",
    "settle_all",
    "shares",
    "task_out",
    "task_status_change",
    "unsettled_task_numbers",
    "unsettled_tasks",
    "vanished_after_cancel",
    "write_task_changes",
]

_TASKS: sa.Table = JobTask.__table__  # type: ignore[attr-defined]

#: which end wins when an array's tasks ended differently (worst first)
_END_ORDER = (JobState.FAILED, JobState.TIMEOUT, JobState.CANCELLED, JobState.COMPLETED)


def is_array(job: Job) -> bool:
    """True for a job submitted with ``--array``."""
    return bool((job.request or {}).get("array"))


def array_spec(job: Job) -> ArraySpec | None:
    """The job's ``--array`` as parsed at submission."""
    text = (job.request or {}).get("array")
    return parse_array(str(text)) if text else None


def shares(total: int, count: int) -> list[int]:
    """``total`` split over ``count`` tasks, adding up exactly to ``total``."""
    return [total * (i + 1) // count - total * i // count for i in range(count)]


def initial_counts(spec: ArraySpec) -> dict[str, int]:
    """A new array job's ``array_counts`` (written with its row)."""
    return {JobState.ACCEPTED.value: spec.count}


def create_tasks(session: Session, *, job_id: str, reserved: int, spec: ArraySpec) -> None:
    """One row per task, each holding its share of the job's reservation ``reserved``
    (the job row itself carries :func:`initial_counts`)."""
    rows = [{"job_id": job_id, "task": task, "state": JobState.ACCEPTED.value, "reserved": share,
             "alloc_tres": {}}
            for task, share in zip(spec.task_ids, shares(reserved, spec.count), strict=True)]
    session.execute(sa.insert(JobTask.__table__), rows)  # type: ignore[attr-defined]


def unsettled_tasks(session: Session, job_ids: Sequence[str]) -> dict[str, list[Any]]:
    """The tasks still tracked (not settled) of each of ``job_ids``, in task order, as
    plain rows of what a poll compares (``id``, ``task``, ``state``, ``raw_state``,
    ``started_at``, ``reason``, ``cancel_requested_at``): a steady tracker cycle reads
    every live array's tasks, and loading each as an object was most of its CPU."""
    found: dict[str, list[Any]] = {}
    if not job_ids:
        return found
    for row in session.execute(_unsettled_statement(), {"ids": list(job_ids)}).all():
        found.setdefault(row.job_id, []).append(row)
    return found


def unsettled_task_numbers(session: Session, job_ids: Sequence[str]) -> dict[str, list[int]]:
    """The numbers of the tasks still tracked of each of ``job_ids``, in task order
    (plain values: what a poll names, without loading the tasks)."""
    found: dict[str, list[int]] = {}
    if job_ids:
        for job_id, task in session.execute(_unsettled_statement(numbers_only=True), {"ids": list(job_ids)}).all():
            found.setdefault(job_id, []).append(int(task))
    return found


@functools.cache
def _unsettled_statement(*, numbers_only: bool = False) -> sa.Select[Any]:
    """Tasks not settled yet of the jobs ``:ids``, by job and task (built once per shape)."""
    t = _TASKS.c
    columns = (t.job_id, t.task) if numbers_only else (
        t.id, t.job_id, t.task, t.state, t.raw_state, t.started_at, t.reason, t.cancel_requested_at)
    return (sa.select(*columns)
            .where(t.job_id.in_(sa.bindparam("ids", expanding=True)), t.settled_at.is_(None))
            .order_by(t.job_id, t.task))


def aggregate_state(states: Iterable[str]) -> JobState:
    """The whole array's state from its tasks' (see the module docstring)."""
    seen = [JobState(s) for s in states]
    live = {s for s in seen if s not in TERMINAL_STATES}
    if not seen:
        return JobState.ACCEPTED
    if live:
        for state in (JobState.RUNNING, JobState.PENDING, JobState.ACCEPTED):
            if state in live or (state == JobState.RUNNING and JobState.COMPLETING in live):
                return state
        return JobState.UNKNOWN
    for state in _END_ORDER:
        if state in seen:
            return state
    return seen[0]


def mark_submitted(session: Session, *, job_id: str, scheduler_job_id: str) -> None:
    """The tasks reached the scheduler: ``<array id>_<task>``, PENDING."""
    table = JobTask.__table__  # type: ignore[attr-defined]
    session.execute(sa.update(table).where(table.c.job_id == job_id, table.c.state == JobState.ACCEPTED.value)
                    .values(state=JobState.PENDING.value,
                            scheduler_job_id=sa.literal(f"{scheduler_job_id}_") + sa.cast(table.c.task, sa.String)))
    job_table = Job.__table__  # type: ignore[attr-defined]
    counts = _counts(session, job_id)
    session.execute(sa.update(job_table).where(job_table.c.id == job_id).values(array_counts=counts))


def _counts(session: Session, job_id: str) -> dict[str, int]:
    rows = session.execute(sa.select(JobTask.state, sa.func.count())  # type: ignore[call-overload]
                           .where(JobTask.job_id == job_id).group_by(JobTask.state)).all()
    return {str(state): int(n) for state, n in rows}


def task_status_change(task: Any, status: JobStatus) -> dict[str, Any] | None:
    """What a not-yet-final task status changes of ``task`` (a row of
    :func:`unsettled_tasks`) — its ``state``, ``raw_state``, ``started_at`` and
    ``reason``, for :func:`write_task_changes` — or None when nothing changes. A
    terminal word waits for accounting as COMPLETING."""
    state = JobState.COMPLETING if status.state in TERMINAL_STATES else status.state
    if state == JobState.UNKNOWN:
        return None
    started = task.started_at or (status.start_time if state != JobState.PENDING else None)
    reason = status.reason[:2000] if status.reason else None
    if (task.state, task.raw_state, task.started_at, task.reason) == (
            state.value, status.raw_state[:64], started, reason):
        return None
    return {"b_id": task.id, "b_state": state.value, "b_raw": status.raw_state[:64], "b_started": started,
            "b_reason": reason}


def write_task_changes(session: Session, changes: Sequence[dict[str, Any]]) -> None:
    """The changes of :func:`task_status_change`, in one batched UPDATE (a task settled
    meanwhile is left alone)."""
    if changes:
        session.execute(_task_change_statement(), list(changes))


@functools.cache
def _task_change_statement() -> sa.Update:
    t = _TASKS.c
    return (sa.update(_TASKS).where(t.id == sa.bindparam("b_id"), t.settled_at.is_(None))
            .values(state=sa.bindparam("b_state"), raw_state=sa.bindparam("b_raw"),
                    started_at=sa.bindparam("b_started"), reason=sa.bindparam("b_reason")))


def note_cancel(session: Session, *, job_id: str) -> None:
    """The whole array's cancel was asked for: every task still tracked knows when."""
    table = JobTask.__table__  # type: ignore[attr-defined]
    session.execute(sa.update(table).where(table.c.job_id == job_id, table.c.settled_at.is_(None),
                                           table.c.cancel_requested_at.is_(None))
                    .values(cancel_requested_at=utcnow()))


def vanished_after_cancel(task: Any, status: JobStatus | None, *, key: str, now: datetime,
                          grace_seconds: float) -> JobStatus | None:
    """The end of a task cancelled before it started, which the scheduler does not
    confirm: Slurm drops a waiting task from the array's pending record and keeps
    no accounting of it, and a waiting array cancelled as a whole is accounted as
    never eligible, which slurmdb's time-window queries (slurm_rest) do not return.
    Once ``grace_seconds`` passed since the cancel — so that a task which did start
    meanwhile shows its usage first — it ends ``CANCELLED``; nothing ran, nothing is
    charged. None while it may still appear or is still alive."""
    if task.cancel_requested_at is None:
        return None
    if status is None:
        if task.started_at is not None:
            return None  # it ran: its accounting will come
    elif status.final or status.state not in TERMINAL_STATES or status.elapsed_seconds or status.alloc_tres:
        return None  # alive, confirmed, or it used something (settled from accounting)
    if (now - task.cancel_requested_at).total_seconds() < grace_seconds:
        return None
    return JobStatus(job_id=key, state=JobState.CANCELLED, raw_state="CANCELLED", final=True,
                     reason="cancelled before it started (the scheduler keeps no usable record of it)",
                     end_time=task.cancel_requested_at, elapsed_seconds=0, array_task_id=task.task)


def refresh(session: Session, *, job: Job, expected_start: datetime | None = None) -> None:
    """Recompute the job's aggregate state and counts from its tasks (written only
    when they changed); settle the job itself — no money moves: its tasks did —
    once every task is settled."""
    # counted by the database (a steady tracker cycle calls this for every live array:
    # loading each task as an object was most of its CPU); the tasks themselves only
    # once all are settled
    session.flush()  # the tasks' changes of this transaction first (a Core statement does not autoflush)
    rows = session.execute(_task_summary_statement(), {"job_id": job.id}).all()
    counts = {str(state): int(n) for state, n, _, _ in rows}
    state = aggregate_state(counts)
    if rows and all(settled == n for _, n, settled, _ in rows):
        tasks = list(session.exec(select(JobTask).where(JobTask.job_id == job.id)
                                  .execution_options(populate_existing=True)).all())
        finish_if_done(session, job=job, tasks=tasks, counts=counts, state=state)
        return
    waiting = state == JobState.PENDING
    reason = session.execute(_pending_reason_statement(), {"job_id": job.id}).scalar() if waiting else None
    pending_reason = reason[:128] if reason else None
    expected = expected_start if waiting else None
    started = [first for _, _, _, first in rows if first is not None]
    first_start = job.started_at or (min(started) if started else None)
    if (job.state, job.raw_state, job.unknown_since, job.started_at, job.pending_reason, job.expected_start_at,
            job.array_counts) == (state.value, state.value, None, first_start, pending_reason, expected, counts):
        return
    if (job.state, job.pending_reason) != (state.value, pending_reason):
        events.record_for(session, job, state=state.value, previous=job.state, pending_reason=pending_reason)
    job.state, job.raw_state, job.unknown_since, job.started_at = state.value, state.value, None, first_start
    job.pending_reason, job.expected_start_at = pending_reason, expected
    job.array_counts, job.last_polled_at = counts, utcnow()
    session.add(job)


@functools.cache
def _task_summary_statement() -> sa.Select[Any]:
    """Per state of one array's tasks: how many, how many settled, the first start."""
    t = _TASKS.c
    return (sa.select(t.state, sa.func.count(), sa.func.count(t.settled_at), sa.func.min(t.started_at))
            .where(t.job_id == sa.bindparam("job_id")).group_by(t.state))


@functools.cache
def _pending_reason_statement() -> sa.Select[Any]:
    """What Slurm says of one waiting task of an array (the lowest-numbered one)."""
    t = _TASKS.c
    return (sa.select(t.reason)
            .where(t.job_id == sa.bindparam("job_id"), t.state == JobState.PENDING.value, t.reason.is_not(None))
            .order_by(t.task).limit(1))


def finish_if_done(session: Session, *, job: Job, tasks: list[JobTask], counts: dict[str, int],
                   state: JobState) -> bool:
    """Every task settled: the job ends with the aggregate state (once)."""
    table = Job.__table__  # type: ignore[attr-defined]
    now = utcnow()
    exits = [t.exit_code for t in tasks if t.exit_code is not None]
    ends = [t.ended_at for t in tasks if t.ended_at is not None]
    starts = [t.started_at for t in tasks if t.started_at is not None]
    elapsed = [t.elapsed_seconds for t in tasks if t.elapsed_seconds is not None]
    result = session.execute(
        sa.update(table).where(table.c.id == job.id, table.c.settled_at.is_(None))
        .values(settled_at=now, state=state.value, raw_state=state.value, reserved=0,
                charged=sum(t.charged or 0 for t in tasks), exit_code=max(exits) if exits else None,
                elapsed_seconds=max(elapsed) if elapsed else None,
                alloc_tres=dict(tasks[0].alloc_tres) if tasks else {},
                ended_at=max(ends) if ends else now, started_at=job.started_at or (min(starts) if starts else None),
                unknown_since=None, pending_reason=None, expected_start_at=None, array_counts=counts)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    events.record_for(session, job, state=state.value, previous=job.state)
    SETTLEMENTS.labels(state.value).inc()
    session.expire(job)
    return True


def settle_all(session: Session, *, job: Job, status: JobStatus) -> None:
    """The whole array ended before reaching the scheduler (``SUBMIT_FAILED``):
    its tasks end with it; the job's own settlement releases the whole reservation."""
    table = JobTask.__table__  # type: ignore[attr-defined]
    session.execute(sa.update(table).where(table.c.job_id == job.id, table.c.settled_at.is_(None))
                    .values(settled_at=utcnow(), state=status.state.value, raw_state=status.raw_state[:64],
                            reserved=0, charged=0, reason=status.reason))
    jobs = Job.__table__  # type: ignore[attr-defined]
    session.execute(sa.update(jobs).where(jobs.c.id == job.id).values(array_counts=_counts(session, job.id)))


def array_out(job: Any) -> ArrayOut | None:
    """The ``array`` object of the job record (None for a plain job); ``job``: a
    loaded job or a row with its ``request`` and ``array_counts``."""
    text = (job.request or {}).get("array")
    if not text:
        return None
    spec = parse_array(str(text))
    counts = {str(k): int(v) for k, v in (job.array_counts or {}).items()}
    return ArrayOut(spec=spec.text, tasks=spec.count, max_running=spec.max_running, counts=counts)


def task_out(job: Job, task: JobTask) -> JobTaskOut:
    """One task as the API shows it."""
    return JobTaskOut(
        task=task.task, scheduler_job_id=task.scheduler_job_id, state=task.state, raw_state=task.raw_state,
        exit_code=task.exit_code, elapsed_seconds=task.elapsed_seconds,
        reserved=Money(unit=job.unit, amount=to_units(task.reserved) or 0.0),
        charged=None if task.charged is None else Money(unit=job.unit, amount=to_units(task.charged) or 0.0),
        started_at=task.started_at, ended_at=task.ended_at, reason=task.reason,
    )
