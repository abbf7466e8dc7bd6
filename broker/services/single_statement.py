"""PostgreSQL: a plain submission's two writes, each one statement run in autocommit.

A submission writes twice (broker/services/jobs.py): the reservation with the job
row ``ACCEPTED`` and its event, committed before the scheduler is asked; then the
scheduler's id (``PENDING``) with its event. In a transaction each write is three or
four statements plus ``BEGIN`` and ``COMMIT``: a round trip each, and SQLAlchemy's CPU
for each. Here each write is one statement of data-modifying ``WITH`` clauses, sent
in autocommit: a statement is its own transaction, so its rows are written all
together or not at all, exactly as the transaction wrote them, in one round trip.

* :func:`reserve_job` — ``WITH reserved AS (UPDATE allocations … WHERE the balance
  covers it RETURNING id), job AS (INSERT INTO jobs … SELECT … FROM reserved
  RETURNING id), event AS (INSERT INTO job_events … SELECT … FROM job) INSERT INTO
  ledger_entries … SELECT … FROM reserved RETURNING id``. The job and its event are
  inserted from the reserving UPDATE's row only: when the budget does not cover the
  job, the statement writes nothing and returns no row. The allocation's row lock
  is held from this statement's UPDATE to its own commit, inside the server.
* :func:`record_submitted` — ``WITH moved AS (UPDATE jobs … WHERE state = 'ACCEPTED'
  … RETURNING …), event AS (INSERT INTO job_events … SELECT … FROM moved) SELECT …,
  set_config('synchronous_commit', 'off', true) FROM moved``: committed without
  waiting for the WAL flush (see the function).

The callers use them only when nothing else belongs in the same transaction (no
idempotency key, no webhook, not an array job); otherwise the transactional path
runs. Event ids are given at commit by the trigger of migration 0016, as for every
event row (broker/events.py). Statements are built once per shape: building them
costs more CPU than running them.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from broker import events
from broker.direct import Statement
from broker.models import Job, UTCDateTime
from broker.services import ledger
from broker.states import JobState


def reserve_job(session: Session, *, job: dict[str, Any], amount: int, actor: str, at: datetime) -> bool:
    """Reserve ``amount`` on the job's allocation and write the job row ``job`` (its
    columns; None values are left NULL), its ``ACCEPTED`` event and its reserve
    ledger row, in one statement. False, with nothing written, when the allocation's
    budget does not cover ``amount``."""
    columns = tuple(k for k, v in job.items() if v is not None)
    params = {f"new_job_{k}": job[k] for k in columns}
    entry = ledger.reserve_entry(project_id=job["project_id"], amount=amount, job_id=job["id"],
                                 user_id=job["user_id"], actor=actor, at=at)
    params.update({f"entry_{k}": v for k, v in entry.items()})
    params.update(reserve_amount=amount, reserve_allocation=job["allocation_id"], event_at=at)
    return _reserve_job_statement(columns).first(session, params) is not None


@functools.cache
def _reserve_job_statement(columns: tuple[str, ...]) -> Statement:
    jobs = Job.__table__  # type: ignore[attr-defined]
    reserved = ledger.reserve_statement().returning(ledger.ALLOCATIONS.c.id).cte("reserved")
    # bind names unlike any column of the tables written: an UPDATE or INSERT sets
    # every column whose name is a key of the parameters
    job_values = [sa.bindparam(f"new_job_{c}", type_=jobs.c[c].type) for c in columns]
    job = (sa.insert(jobs).from_select(list(columns), sa.select(*job_values).select_from(reserved))
           .returning(jobs.c.id, jobs.c.project_id, jobs.c.user_id).cte("job"))
    event = events.insert_from(job, state=JobState.ACCEPTED.value, previous=None).cte("event")
    return Statement(ledger.insert_reserve_entry(reserved).add_cte(job, event))


def record_submitted(conn: sa.Connection, *, job_id: str, scheduler_job_id: str, at: datetime) -> bool:
    """``ACCEPTED`` → ``PENDING`` with the scheduler's id and its event, in one
    statement on ``conn`` (in autocommit); False (nothing written) when the job is no
    longer ``ACCEPTED`` or has a scheduler id already (the reconciler got there first).

    Committed asynchronously (``synchronous_commit = off`` for this statement's own
    transaction only, set by the statement): the answer does not wait for the WAL
    flush, a measured 0.5-1 ms per submission at c=1 on the dev host. What a
    PostgreSQL crash can lose is this step only (never a half of it), and losing it
    is the case the design already recovers from, the broker dying between the
    scheduler's submit and this record: the job stays ``ACCEPTED`` with its
    reservation and the reconciler adopts it by its tag. The reservation, which
    nothing could rebuild, still commits synchronously."""
    rows = _record_submitted_statement().run(
        conn, {"rec_job": job_id, "rec_sched": scheduler_job_id, "rec_at": at, "event_at": at})
    return bool(rows)


@functools.cache
def _record_submitted_statement() -> Statement:
    jobs = Job.__table__  # type: ignore[attr-defined]
    moved = (sa.update(jobs)
             .where(jobs.c.id == sa.bindparam("rec_job"), jobs.c.state == JobState.ACCEPTED.value,
                    jobs.c.scheduler_job_id.is_(None))
             .values(state=JobState.PENDING.value, scheduler_job_id=sa.bindparam("rec_sched"),
                     submitted_at=sa.bindparam("rec_at", type_=UTCDateTime))
             .returning(jobs.c.id, jobs.c.project_id, jobs.c.user_id).cte("moved"))
    event = events.insert_from(moved, state=JobState.PENDING.value, previous=JobState.ACCEPTED.value).cte("event")
    # set_config(..., is_local => true): this statement's transaction only (autocommit),
    # never the pooled connection's later ones; evaluated for a row that moved, i.e.
    # exactly when there is something to commit. The arguments are SQL constants.
    asynchronous = sa.func.set_config(sa.literal_column("'synchronous_commit'"), sa.literal_column("'off'"),
                                      sa.true())
    return Statement(sa.select(moved.c.id, asynchronous).add_cte(event))
