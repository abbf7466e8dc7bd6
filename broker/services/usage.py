"""Usage reports from the ledger (``charge`` and ``import`` entries).

Usage is attributed to when it happened (``occurred_at`` = the job's end), grouped
by any of user, cluster, partition, day, month. Amounts are per unit (an
allocation's unit), so every row carries its unit.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from broker.auth import Principal
from broker.errors import InvalidRequest
from broker.models import Allocation, Cluster, ImportedJob, Job, LedgerEntry, Project, User
from broker.services.common import require_role, to_units, today, visible_project

GROUP_KEYS = ("user", "cluster", "partition", "day", "month")
USAGE_KINDS = ("charge", "import")


@dataclass(frozen=True)
class UsageRow:
    keys: dict[str, str]
    unit: str
    amount: float
    jobs: int


def parse_group_by(raw: str | None) -> list[str]:
    if not raw:
        return []
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    bad = [k for k in keys if k not in GROUP_KEYS]
    if bad:
        raise InvalidRequest(f"Unknown group_by key(s): {', '.join(bad)} (use {', '.join(GROUP_KEYS)}).")
    return list(dict.fromkeys(keys))


def _bounds(start: date | None, end: date | None) -> tuple[datetime | None, datetime | None]:
    if start and end and end < start:
        raise InvalidRequest("`to` is before `from`.")
    lo = datetime.combine(start, time.min, UTC) if start else None
    hi = datetime.combine(end + timedelta(days=1), time.min, UTC) if end else None
    return lo, hi


def project_usage(
    session: Session, *, principal: Principal, code: str, group_by: list[str],
    start: date | None, end: date | None,
) -> list[UsageRow]:
    project, _ = visible_project(session, principal, code)
    return usage_rows(session, project_ids=[project.id or 0], group_by=group_by, start=start, end=end)


def usage_rows(
    session: Session, *, project_ids: list[int] | None, group_by: list[str],
    start: date | None, end: date | None,
) -> list[UsageRow]:
    """Charged usage grouped by ``group_by`` (+ unit), from the ledger."""
    lo, hi = _bounds(start, end)
    q = (select(LedgerEntry.amount, LedgerEntry.occurred_at, Allocation.unit, Cluster.name,
                User.name, Job.partition, ImportedJob.partition, ImportedJob.username, Project.code)
         .join(Allocation, Allocation.id == LedgerEntry.allocation_id)  # type: ignore[arg-type]
         .join(Cluster, Cluster.id == Allocation.cluster_id)  # type: ignore[arg-type]
         .join(Project, Project.id == LedgerEntry.project_id)  # type: ignore[arg-type]
         .outerjoin(User, User.id == LedgerEntry.user_id)  # type: ignore[arg-type]
         .outerjoin(Job, Job.id == LedgerEntry.job_id)  # type: ignore[arg-type]
         .outerjoin(ImportedJob, ImportedJob.id == LedgerEntry.imported_job_id)  # type: ignore[arg-type]
         .where(col(LedgerEntry.kind).in_(USAGE_KINDS)))
    if project_ids is not None:
        q = q.where(col(LedgerEntry.project_id).in_(project_ids))
    if lo:
        q = q.where(col(LedgerEntry.occurred_at) >= lo)
    if hi:
        q = q.where(col(LedgerEntry.occurred_at) < hi)
    totals: dict[tuple[tuple[str, str], ...], list[int]] = defaultdict(lambda: [0, 0])
    for amount, occurred, unit, cluster, user, part, ipart, iuser, code in session.exec(q).all():
        values = {"user": user or (f"{iuser} (unmapped)" if iuser else "-"), "cluster": cluster,
                  "partition": part or ipart or "-", "day": occurred.date().isoformat(),
                  "month": occurred.strftime("%Y-%m"), "project": code}
        key = (*((k, values[k]) for k in ["project", *group_by]), ("unit", unit))
        totals[key][0] += amount
        totals[key][1] += 1
    rows = []
    for key, (amount, jobs) in sorted(totals.items()):
        keys = dict(key)
        unit = keys.pop("unit")
        rows.append(UsageRow(keys, unit, to_units(amount) or 0.0, jobs))
    return rows


def rows_to_csv(rows: list[UsageRow], group_by: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["project", *group_by, "unit", "amount", "jobs"])
    for r in rows:
        writer.writerow([r.keys["project"], *(r.keys[k] for k in group_by), r.unit, f"{r.amount:.6f}", r.jobs])
    return out.getvalue()


def portfolio(session: Session, *, principal: Principal, window_days: int = 14) -> list[dict[str, object]]:
    """All allocations with used/reserved/remaining, burn rate and projected exhaustion."""
    require_role(principal, "quota_manager")
    since = datetime.combine(today() - timedelta(days=window_days), time.min, UTC)
    burned = dict(session.exec(
        select(LedgerEntry.allocation_id, sa.func.sum(LedgerEntry.amount))
        .where(col(LedgerEntry.kind).in_(USAGE_KINDS), col(LedgerEntry.occurred_at) >= since)
        .group_by(col(LedgerEntry.allocation_id))
    ).all())
    rows = session.exec(
        select(Allocation, Project, Cluster)
        .join(Project, Project.id == Allocation.project_id)  # type: ignore[arg-type]
        .join(Cluster, Cluster.id == Allocation.cluster_id)  # type: ignore[arg-type]
        .order_by(col(Project.code), col(Allocation.id))
    ).all()
    out: list[dict[str, object]] = []
    for alloc, project, cluster in rows:
        remaining = alloc.granted - alloc.charged - alloc.reserved
        per_day = int(burned.get(alloc.id) or 0) / window_days
        exhaustion = (today() + timedelta(days=int(remaining / per_day))).isoformat() \
            if per_day > 0 and remaining > 0 else None
        out.append({
            "project": project.code, "status": project.status, "cluster": cluster.name,
            "allocation_id": alloc.id, "unit": alloc.unit, "granted": to_units(alloc.granted),
            "used": to_units(alloc.charged), "reserved": to_units(alloc.reserved),
            "remaining": to_units(remaining),
            "percent_used": round(100 * alloc.charged / alloc.granted, 2) if alloc.granted else None,
            "burn_rate_per_day": to_units(round(per_day)), "projected_exhaustion": exhaustion,
            "start_date": alloc.start_date, "end_date": alloc.end_date,
        })
    return out
