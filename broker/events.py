"""Job events: every transition of a job, written in the transaction that makes it.

Whoever changes a job's state (the submit path, the tracker, settlement) calls
:func:`record` inside its session; the rows are inserted just before that session
commits, so an event exists exactly when its transition does (a rollback drops
both). Readers (long polls, Server-Sent Events, see :mod:`broker.api.streams`)
resume from an event id, so ids must grow in **commit order**, or a reader that
has seen id 8 could miss a 7 committed later:

* PostgreSQL: the row is inserted with a provisional negative id; a deferred
  constraint trigger (migration 0016), which the server runs inside COMMIT, takes a
  transaction-scoped advisory lock and gives the row its id from the table's
  sequence. The lock is held from that trigger to the end of the commit, inside the
  server (no client round trip under it), and a commit is visible before its locks
  are released, so ids are handed out in commit order. The trigger also queues the
  ``pg_notify`` on :data:`CHANNEL` (delivered at commit) that wakes the listeners of
  every replica at once.
* SQLite: every write transaction is serialised (``BEGIN IMMEDIATE``, broker/db.py),
  so ids are in commit order already; readers poll.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from broker.models import Job, JobEvent, utcnow

__all__ = ["CHANNEL", "Transition", "flush", "insert_from", "record", "record_for"]

#: PostgreSQL NOTIFY channel announcing new job events (no payload: readers query)
CHANNEL = "aifa_job_events"
_PENDING = "aifa_job_events"
_INSERT = sa.insert(JobEvent.__table__)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Transition:
    """What one job event says (the row of ``job_events`` without its id)."""

    job_id: str
    project_id: int
    user_id: int
    state: str
    previous_state: str | None
    pending_reason: str | None
    occurred_at: datetime


def record(session: Session, *, job_id: str, project_id: int, user_id: int, state: str,
           previous: str | None, pending_reason: str | None = None) -> None:
    """Note that job ``job_id`` moved from ``previous`` to ``state`` (or that what the
    scheduler says about it changed); written when ``session`` commits."""
    session.info.setdefault(_PENDING, []).append(Transition(
        job_id=job_id, project_id=project_id, user_id=user_id, state=state,
        previous_state=previous, pending_reason=pending_reason, occurred_at=utcnow()))


def record_for(session: Session, job: Job, *, state: str, previous: str | None,
               pending_reason: str | None = None) -> None:
    """:func:`record` for a loaded job row."""
    record(session, job_id=job.id, project_id=job.project_id, user_id=job.user_id, state=state,
           previous=previous, pending_reason=pending_reason)


def flush(session: Session) -> None:
    """Write the events noted so far in ``session`` now rather than at its commit.

    The submit path calls it before it takes the allocation's row lock, so that
    lock is held for the commit alone, not also for this insert."""
    pending: list[Transition] = session.info.pop(_PENDING, [])
    if not pending:
        return
    # stamped when written (at the commit, or just before it for the submit path): a
    # transition happens when it is committed
    written = utcnow()
    rows = [{"job_id": p.job_id, "project_id": p.project_id, "user_id": p.user_id, "state": p.state,
             "previous_state": p.previous_state, "pending_reason": p.pending_reason, "occurred_at": written}
            for p in pending]  # not dataclasses.asdict: it deep-copies, and this runs at every commit
    session.execute(_INSERT, rows[0] if len(rows) == 1 else rows)


def insert_from(source: sa.CTE, *, state: str, previous: str | None) -> sa.Insert:
    """``INSERT INTO job_events … SELECT … FROM source``: one event per row of
    ``source`` (its ``id``, ``project_id`` and ``user_id`` columns: the jobs a
    data-modifying ``WITH`` of the same statement just wrote), at the time bound as
    ``event_at``. For a statement that changes jobs and records their transitions in
    one round trip (broker/services/single_statement.py); the rows get their ids at
    commit like every event row."""
    table = JobEvent.__table__  # type: ignore[attr-defined]
    columns = ["job_id", "project_id", "user_id", "state", "occurred_at"]
    values = [source.c.id, source.c.project_id, source.c.user_id, sa.literal(state, table.c.state.type),
              sa.bindparam("event_at", type_=table.c.occurred_at.type)]
    if previous is not None:
        columns.append("previous_state")
        values.append(sa.literal(previous, table.c.previous_state.type))
    return sa.insert(table).from_select(columns, sa.select(*values).select_from(source))


@event.listens_for(Session, "before_commit")
def _write_pending(session: Session) -> None:
    flush(session)


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)
