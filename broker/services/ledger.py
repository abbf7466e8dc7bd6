"""Balances and the append-only ledger.

Every change of an allocation's ``granted``/``reserved``/``charged`` columns goes
through :func:`apply` together with one ledger row, in the caller's transaction.
The balance columns are a cache of the ledger; :func:`check` recomputes them.

Kinds and the column each moves:
``grant``/``adjust`` → granted (±), ``reserve`` → reserved (+), ``release`` →
reserved (−), ``charge``/``import`` → charged (+).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from broker.errors import QuotaExceeded
from broker.models import Allocation, Job, LedgerEntry, pk, utcnow

KIND_COLUMN = {
    "grant": "granted", "adjust": "granted", "reserve": "reserved",
    "release": "reserved", "charge": "charged", "import": "charged",
}
KIND_SIGN = {"grant": 1, "adjust": 1, "reserve": 1, "release": -1, "charge": 1, "import": 1}


def apply(
    session: Session, *, allocation: Allocation, kind: str, amount: int, actor: str,
    reason: str = "", job_id: str | None = None, user_id: int | None = None,
    imported_job_id: int | None = None, occurred_at: datetime | None = None,
) -> LedgerEntry:
    """Move one balance column by ``amount`` (micro-units) and write its ledger row."""
    column = KIND_COLUMN[kind]
    delta = KIND_SIGN[kind] * amount
    table = Allocation.__table__  # type: ignore[attr-defined]
    session.execute(
        sa.update(table).where(table.c.id == allocation.id).values({column: table.c[column] + delta})
    )
    entry = LedgerEntry(
        allocation_id=pk(allocation), project_id=allocation.project_id, kind=kind, amount=amount,
        job_id=job_id, imported_job_id=imported_job_id, user_id=user_id, actor=actor,
        reason=reason, occurred_at=occurred_at or utcnow(),
    )
    session.add(entry)
    session.flush()
    return entry


def reserve(
    session: Session, *, allocation: Allocation, amount: int, job_id: str, user_id: int | None,
    actor: str,
) -> LedgerEntry:
    """Reserve ``amount`` atomically: one conditional UPDATE that succeeds only if
    ``granted - charged - reserved >= amount``, plus its ``reserve`` ledger row.
    Correct under concurrency on PostgreSQL (the row lock taken by UPDATE makes a
    second writer re-check the condition) and SQLite (BEGIN IMMEDIATE serialises
    writers). Raises :class:`QuotaExceeded` when the budget does not cover it; the
    caller's transaction must then roll back (it holds the ledger row already).

    The ledger row is written first, so the allocation's row lock — which every
    submission on this allocation queues for — is held only from the UPDATE to
    the caller's commit, not across one more round trip."""
    entry = LedgerEntry(
        allocation_id=pk(allocation), project_id=allocation.project_id, kind="reserve",
        amount=amount, job_id=job_id, user_id=user_id, actor=actor, reason="job estimate",
    )
    session.add(entry)
    session.flush()
    table = Allocation.__table__  # type: ignore[attr-defined]
    result = session.execute(
        sa.update(table)
        .where(table.c.id == allocation.id)
        .where(table.c.granted - table.c.charged - table.c.reserved >= amount)
        .values(reserved=table.c.reserved + amount)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise QuotaExceeded("The allocation has less budget left than this job's estimate.")
    return entry


@dataclass(frozen=True)
class Drift:
    allocation_id: int
    column: str
    stored: int
    from_ledger: int


def check(session: Session) -> list[Drift]:
    """Recompute every allocation's balances from the ledger; list what differs.

    Reservations held by live jobs are normal: they appear in both the ledger
    (reserve without release yet) and the column. As an extra consistency check,
    the reserved column must equal the sum of live jobs' ``reserved``.
    """
    sums: dict[tuple[int, str], int] = {}
    rows = session.exec(
        select(LedgerEntry.allocation_id, LedgerEntry.kind, sa.func.sum(LedgerEntry.amount))
        .group_by(col(LedgerEntry.allocation_id), col(LedgerEntry.kind))
    ).all()
    for alloc_id, kind, total in rows:
        key = (alloc_id, KIND_COLUMN[kind])
        sums[key] = sums.get(key, 0) + KIND_SIGN[kind] * int(total or 0)
    held = dict(
        session.exec(
            select(Job.allocation_id, sa.func.sum(Job.reserved)).group_by(col(Job.allocation_id))
        ).all()
    )
    drifts: list[Drift] = []
    for alloc in session.exec(select(Allocation)).all():
        assert alloc.id is not None
        for column in ("granted", "reserved", "charged"):
            expected = sums.get((alloc.id, column), 0)
            stored = int(getattr(alloc, column))
            if stored != expected:
                drifts.append(Drift(alloc.id, column, stored, expected))
        live = int(held.get(alloc.id) or 0)
        if live != alloc.reserved:
            drifts.append(Drift(alloc.id, "reserved_by_live_jobs", alloc.reserved, live))
    return drifts
