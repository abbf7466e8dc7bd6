"""Balances and the append-only ledger.

Every change of an allocation's ``granted``/``reserved``/``charged`` columns goes
through :func:`apply` together with one ledger row, in the caller's transaction.
The balance columns are a cache of the ledger; :func:`check` recomputes them.

Kinds and the column each moves:
``grant``/``adjust`` → granted (±), ``reserve`` → reserved (+), ``release`` →
reserved (−), ``charge``/``import`` → charged (+).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from broker.db import insert_values
from broker.errors import QuotaExceeded
from broker.models import Allocation, Job, LedgerEntry, pk, utcnow
from broker.services.admission_rows import AllocationRow

KIND_COLUMN = {
    "grant": "granted", "adjust": "granted", "reserve": "reserved",
    "release": "reserved", "charge": "charged", "import": "charged",
}
KIND_SIGN = {"grant": 1, "adjust": 1, "reserve": 1, "release": -1, "charge": 1, "import": 1}
BALANCE_COLUMNS = ("granted", "reserved", "charged")
ALLOCATIONS: sa.Table = Allocation.__table__  # type: ignore[attr-defined]


class PendingBalances:
    """Balance moves of a batch, applied together at its end (:meth:`apply`, in the
    same transaction as the batch's ledger rows).

    Why: an UPDATE of an allocation's row holds that row's lock until the commit,
    and every submission on the allocation queues for it (the reservation). A batch
    that moved the balance at each of its rows held the lock for the whole batch —
    the usage import's 200-record chunks stalled submissions for as long."""

    def __init__(self) -> None:
        self._moves: dict[tuple[int, str], int] = {}
        self._entries: list[dict[str, Any]] = []

    def add(self, allocation_id: int, column: str, delta: int) -> None:
        key = (allocation_id, column)
        self._moves[key] = self._moves.get(key, 0) + delta

    def entry(self, *, allocation_id: int, project_id: int, kind: str, amount: int, actor: str, reason: str,
              job_id: str, user_id: int | None, occurred_at: datetime, task: int = -1) -> None:
        """One ledger row of a job and its balance move, both written by :meth:`apply`
        (the rows in one INSERT: no ORM object, no flush per row)."""
        self.add(allocation_id, KIND_COLUMN[kind], KIND_SIGN[kind] * amount)
        self._entries.append({
            "allocation_id": allocation_id, "project_id": project_id, "kind": kind, "amount": amount,
            "job_id": job_id, "imported_job_id": None, "user_id": user_id, "actor": actor, "reason": reason,
            "created_at": utcnow(), "occurred_at": occurred_at, "task": task})

    def apply(self, session: Session) -> None:
        """The collected ledger rows (one INSERT), then one UPDATE per allocation (every
        column it moves), in id order (no deadlock between two batches touching the
        same allocations)."""
        if self._entries:
            session.execute(sa.insert(LedgerEntry.__table__), self._entries)  # type: ignore[attr-defined]
            self._entries = []
        table = Allocation.__table__  # type: ignore[attr-defined]
        by_alloc: dict[int, dict[str, int]] = {}
        for (alloc_id, column), delta in self._moves.items():
            if delta:
                by_alloc.setdefault(alloc_id, {})[column] = delta
        for alloc_id, moves in sorted(by_alloc.items()):
            session.execute(sa.update(table).where(table.c.id == alloc_id)
                            .values({c: table.c[c] + d for c, d in sorted(moves.items())}))
        self._moves.clear()


def apply(
    session: Session, *, allocation: Allocation, kind: str, amount: int, actor: str,
    reason: str = "", job_id: str | None = None, user_id: int | None = None,
    imported_job_id: int | None = None, occurred_at: datetime | None = None, task: int = -1,
    pending: PendingBalances | None = None,
) -> LedgerEntry:
    """Move one balance column by ``amount`` (micro-units) and write its ledger row
    (``task``: the array task a release/charge settles; -1 for a whole job). With
    ``pending`` the move is collected there, and the caller applies it before its
    transaction commits."""
    column = KIND_COLUMN[kind]
    delta = KIND_SIGN[kind] * amount
    if pending is not None:
        pending.add(pk(allocation), column, delta)
    else:
        table = Allocation.__table__  # type: ignore[attr-defined]
        session.execute(
            sa.update(table).where(table.c.id == allocation.id).values({column: table.c[column] + delta})
        )
    entry = LedgerEntry(
        allocation_id=pk(allocation), project_id=allocation.project_id, kind=kind, amount=amount,
        job_id=job_id, imported_job_id=imported_job_id, user_id=user_id, actor=actor,
        reason=reason, occurred_at=occurred_at or utcnow(), task=task,
    )
    session.add(entry)
    session.flush()
    return entry


def reserve(
    session: Session, *, allocation: Allocation | AllocationRow, amount: int, job_id: str, user_id: int | None,
    actor: str,
) -> None:
    """Reserve ``amount`` atomically: one conditional UPDATE that succeeds only if
    ``granted - charged - reserved >= amount``, plus its ``reserve`` ledger row.
    Correct under concurrency on PostgreSQL (the row lock taken by UPDATE makes a
    second writer re-check the condition) and SQLite (BEGIN IMMEDIATE serialises
    writers). Raises :class:`QuotaExceeded` when the budget does not cover it; the
    caller's transaction must then roll back (it holds the ledger row already).

    On PostgreSQL both are one statement (the UPDATE in a ``WITH`` that the ledger
    INSERT reads), so the allocation's row lock, which every submission on this
    allocation queues for, is held from that statement to the caller's commit with
    no other round trip in between. On SQLite the ledger row is written first, then
    the UPDATE. Core statements, built once (the submission path)."""
    values = {"allocation_id": pk(allocation), **reserve_entry(project_id=allocation.project_id, amount=amount,
                                                               job_id=job_id, user_id=user_id, actor=actor,
                                                               at=utcnow())}
    if session.get_bind().dialect.name == "postgresql":
        # bind names unlike any allocations column: an UPDATE sets every column whose
        # name is a key of its parameters
        params = {f"entry_{k}": v for k, v in values.items()}
        params["reserve_amount"], params["reserve_allocation"] = amount, allocation.id
        if session.execute(_reserve_and_record_statement(), params).first() is None:
            raise QuotaExceeded("The allocation has less budget left than this job's estimate.")
        return
    insert_values(session, LedgerEntry, values)
    result = session.execute(reserve_statement(), {"reserve_allocation": allocation.id, "reserve_amount": amount})
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise QuotaExceeded("The allocation has less budget left than this job's estimate.")


@functools.cache
def reserve_statement() -> sa.Update:
    """``UPDATE allocations SET reserved = reserved + :reserve_amount WHERE id =
    :reserve_allocation AND granted - charged - reserved >= :reserve_amount``: the one
    conditional UPDATE every reservation is (a row iff the budget covered it)."""
    table = ALLOCATIONS
    amount = sa.bindparam("reserve_amount", type_=sa.BigInteger)
    return (sa.update(table).where(table.c.id == sa.bindparam("reserve_allocation"))
            .where(table.c.granted - table.c.charged - table.c.reserved >= amount)
            .values(reserved=table.c.reserved + amount))


def reserve_entry(*, project_id: int, amount: int, job_id: str, user_id: int | None, actor: str,
                  at: datetime) -> dict[str, Any]:
    """A job's ``reserve`` ledger row, but its ``allocation_id``."""
    return {"project_id": project_id, "kind": "reserve", "amount": amount, "job_id": job_id, "user_id": user_id,
            "actor": actor, "reason": "job estimate", "created_at": at, "occurred_at": at, "task": -1}


#: the columns of :func:`reserve_entry`, in order
RESERVE_ENTRY_COLUMNS = ("project_id", "kind", "amount", "job_id", "user_id", "actor", "reason", "created_at",
                         "occurred_at", "task")


def insert_reserve_entry(reserved: sa.CTE) -> sa.Insert:
    """``INSERT INTO ledger_entries … SELECT reserved.id, … FROM reserved RETURNING id``:
    the reserve row of the allocation the data-modifying ``reserved`` (the
    :func:`reserve_statement` ``RETURNING id``) moved, its other columns bound as
    ``entry_<column>``; a row back iff the budget covered the amount."""
    table = LedgerEntry.__table__  # type: ignore[attr-defined]
    values = [reserved.c.id, *(sa.bindparam(f"entry_{c}", type_=table.c[c].type) for c in RESERVE_ENTRY_COLUMNS)]
    return (sa.insert(table).from_select(["allocation_id", *RESERVE_ENTRY_COLUMNS],
                                         sa.select(*values).select_from(reserved))
            .returning(table.c.id))


@functools.cache
def _reserve_and_record_statement() -> sa.Insert:
    """``WITH r AS (UPDATE allocations … RETURNING id) INSERT INTO ledger_entries
    SELECT … FROM r RETURNING id``: a row back iff the budget covered ``amount``."""
    return insert_reserve_entry(reserve_statement().returning(ALLOCATIONS.c.id).cte("reserved"))


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

    One SELECT reads the balances, the ledger sums and the live jobs together, so
    they come from one snapshot: on PostgreSQL (READ COMMITTED) separate queries
    would see a charge committed between them — the column moved, its ledger row
    not yet counted — and report a drift that is not there while the tracker or
    the usage importer is writing.
    """
    entry = LedgerEntry.__table__  # type: ignore[attr-defined]
    job = Job.__table__  # type: ignore[attr-defined]
    alloc = Allocation.__table__  # type: ignore[attr-defined]

    def signed_sum(column: str) -> sa.ColumnElement[int]:
        whens = [(entry.c.kind == kind, KIND_SIGN[kind] * entry.c.amount)
                 for kind, target in KIND_COLUMN.items() if target == column]
        return sa.func.coalesce(sa.func.sum(sa.case(*whens, else_=0)), 0).label(column)

    sums = (sa.select(entry.c.allocation_id, *(signed_sum(c) for c in BALANCE_COLUMNS))
            .group_by(entry.c.allocation_id).subquery())
    held = (sa.select(job.c.allocation_id, sa.func.sum(job.c.reserved).label("live"))
            .group_by(job.c.allocation_id).subquery())
    rows = session.execute(
        sa.select(alloc.c.id, *(alloc.c[c] for c in BALANCE_COLUMNS),
                  *(sums.c[c] for c in BALANCE_COLUMNS), held.c.live)
        .select_from(alloc.outerjoin(sums, sums.c.allocation_id == alloc.c.id)
                     .outerjoin(held, held.c.allocation_id == alloc.c.id))
        .order_by(alloc.c.id)
    ).all()
    drifts: list[Drift] = []
    for row in rows:
        alloc_id, stored_values = int(row[0]), row[1:1 + len(BALANCE_COLUMNS)]
        ledger_values = row[1 + len(BALANCE_COLUMNS):1 + 2 * len(BALANCE_COLUMNS)]
        for column, stored, expected in zip(BALANCE_COLUMNS, stored_values, ledger_values, strict=True):
            if int(stored) != int(expected or 0):
                drifts.append(Drift(alloc_id, column, int(stored), int(expected or 0)))
        live, reserved = int(row[-1] or 0), int(stored_values[1])
        if live != reserved:
            drifts.append(Drift(alloc_id, "reserved_by_live_jobs", reserved, live))
    return drifts
