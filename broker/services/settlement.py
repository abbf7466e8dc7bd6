"""Settlement: a finished job's reservation released and what it used charged — once.

:func:`settle` settles one loaded job (a submission that failed, ``mark_submit_failed``);
:func:`settle_ended` settles a polling cycle's ended jobs of one cluster together,
in the caller's transaction: one read of their rows, one conditional UPDATE per
job, their ledger rows in one INSERT, their events in one INSERT, each allocation's
balance in one UPDATE last (its row lock, which every submission on the allocation
queues for, is held from there to the commit only) and one threshold check per
allocation. Per job that is a few hundred microseconds of the tracker's CPU where
an ORM load, two ORM flushes and a savepoint per job cost milliseconds.

Exactly once, whatever the concurrency or retries: a job's conditional UPDATE
(``settled_at IS NULL``) is what settles it, and only a job it moved gets ledger
rows; the ledger's unique (job, task, kind) backs that up, and a second tracker
replica waits for the first one's row lock, then finds the job settled.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from broker import events
from broker.adapter import JobStatus
from broker.cost import cost_micro, find_partition, memory_rule
from broker.metrics import SETTLEMENTS
from broker.models import Cluster, Job, UTCDateTime, utcnow
from broker.services import arrays, ledger, notifications
from broker.states import JobState

#: what settling reads of a job (a loaded :class:`Job` has them as well)
SETTLE_COLUMNS = ("id", "state", "partition", "unit", "reserved", "allocation_id", "project_id", "user_id",
                  "started_at", "reason", "array_counts")


@functools.cache
def _settle_statement() -> sa.Update:
    """One job's end, only if it is not settled yet (built once; bind names unlike
    the column names, which SQLAlchemy reserves in an UPDATE)."""
    table = Job.__table__  # type: ignore[attr-defined]
    return (sa.update(table).where(table.c.id == sa.bindparam("b_id"), table.c.settled_at.is_(None))
            .values(settled_at=sa.bindparam("b_now", type_=UTCDateTime), state=sa.bindparam("b_state"),
                    raw_state=sa.bindparam("b_raw"), charged=sa.bindparam("b_charged", type_=sa.BigInteger),
                    reserved=0, exit_code=sa.bindparam("b_exit"), elapsed_seconds=sa.bindparam("b_elapsed"),
                    alloc_tres=sa.bindparam("b_tres", type_=table.c.alloc_tres.type),
                    ended_at=sa.bindparam("b_ended", type_=UTCDateTime),
                    started_at=sa.bindparam("b_started", type_=UTCDateTime),
                    reason=sa.bindparam("b_reason"), unknown_since=None, pending_reason=None,
                    expected_start_at=None))


@functools.cache
def _ended_jobs_statement() -> sa.Select[Any]:
    """The unsettled jobs among ``ids`` (built once)."""
    table = Job.__table__  # type: ignore[attr-defined]
    return sa.select(*(table.c[c] for c in SETTLE_COLUMNS)).where(
        table.c.id.in_(sa.bindparam("ids", expanding=True)), table.c.settled_at.is_(None))


def _settle_one(session: Session, job: Any, status: JobStatus, *, cost_model: dict[str, object],
                partition: dict[str, object] | None, pending: ledger.PendingBalances) -> bool:
    """Settle ``job`` (a :class:`Job` or a row of :data:`SETTLE_COLUMNS`) if it is not
    settled yet: its UPDATE and event now, its ledger rows and balance moves into
    ``pending`` (the caller applies them before it commits). False if it was settled
    already."""
    seconds = status.elapsed_seconds or 0
    charge = 0 if status.state == JobState.SUBMIT_FAILED else cost_micro(
        cost_model, partition=job.partition, unit=job.unit, tres=memory_rule(status.alloc_tres, partition),
        seconds=seconds)
    now = utcnow()
    result = session.execute(_settle_statement(), {
        "b_id": job.id, "b_now": now, "b_state": status.state.value, "b_raw": status.raw_state[:64],
        "b_charged": charge, "b_exit": status.exit_code, "b_elapsed": status.elapsed_seconds,
        "b_tres": dict(status.alloc_tres), "b_ended": status.end_time or now,
        "b_started": job.started_at or status.start_time, "b_reason": status.reason or job.reason})
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    events.record(session, job_id=job.id, project_id=job.project_id, user_id=job.user_id,
                  state=status.state.value, previous=job.state)
    occurred = status.end_time or now
    common = {"allocation_id": job.allocation_id, "project_id": job.project_id, "actor": "tracker",
              "job_id": job.id, "user_id": job.user_id, "occurred_at": occurred}
    pending.entry(kind="release", amount=job.reserved, reason=f"job {status.state.value.lower()}", **common)
    pending.entry(kind="charge", amount=charge, reason=f"{seconds}s × allocated TRES", **common)
    SETTLEMENTS.labels(status.state.value).inc()
    return True


def _finish(session: Session, pending: ledger.PendingBalances, allocation_ids: set[int]) -> None:
    """Write a settlement's ledger rows and events, then the balances (their row
    locks last), then look for threshold crossings."""
    events.flush(session)  # before the allocations' row locks, not under them
    pending.apply(session)
    notifications.on_charged(session, allocation_ids)


def settle(session: Session, *, job: Job, status: JobStatus, cost_model: dict[str, object]) -> bool:
    """Release the reservation and charge the measured usage of one loaded job —
    exactly once (see the module docstring); False if it was settled already."""
    cluster = session.get(Cluster, job.cluster_id)
    partition = find_partition(cluster.partitions if cluster is not None else [], job.partition)
    pending = ledger.PendingBalances()
    if not _settle_one(session, job, status, cost_model=cost_model, partition=partition, pending=pending):
        return False
    if arrays.is_array(job):  # ended as a whole before any task was settled (submit failed)
        arrays.settle_all(session, job=job, status=status)
    _finish(session, pending, {job.allocation_id})
    session.expire(job)
    return True


def settle_ended(session: Session, ended: Sequence[tuple[str, JobStatus]], *, cluster: Cluster) -> list[str]:
    """Settle the plain (not array) jobs of ``cluster`` that ``ended`` names (job id
    and its final status) and that are not settled yet, in ``session``'s
    transaction; returns the ids settled. Jobs are updated in id order, so two
    concurrent batches lock their rows in the same order."""
    if not ended:
        return []
    statuses = dict(ended)
    rows = session.execute(_ended_jobs_statement(), {"ids": sorted(statuses)}).all()
    pending = ledger.PendingBalances()
    partitions = cluster.partitions or []
    settled: list[str] = []
    allocation_ids: set[int] = set()
    for row in sorted(rows, key=lambda r: str(r.id)):
        if row.array_counts is not None:  # an array settles per task (the tracker's array path)
            continue
        if _settle_one(session, row, statuses[row.id], cost_model=cluster.cost_model,
                       partition=find_partition(partitions, row.partition), pending=pending):
            settled.append(row.id)
            allocation_ids.add(row.allocation_id)
    if settled:
        _finish(session, pending, allocation_ids)
    return settled
