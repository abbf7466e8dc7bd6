"""Usage reports from the ledger (``charge`` and ``import`` entries).

Usage is attributed to when it happened (``occurred_at`` = the job's end), grouped
by any of user, cluster, partition, day, month, for any date range. Amounts are
per unit (an allocation's unit), so every row carries its unit. Grouping happens
in the database (one ``GROUP BY`` query over the ``occurred_at`` index), so reports
stay fast on long histories.

The portfolio (:func:`allocation_summaries`) adds, per allocation: used, reserved
(live jobs at their estimate), remaining, burn rate over a window, projected
exhaustion date, days left, and whether the allocation is *under-used* for the
share of its validity that has elapsed. Rules (kept simple so that anyone can
recompute them):

- burn rate = usage in the last ``window_days`` days (up to and including today) /
  the number of those days the allocation existed (at least 1);
- projected exhaustion = today + remaining / burn rate, when that falls before the
  allocation's end (``forecast`` = ``before_end``); a projection at or past the end is
  ``not_before_end`` (no date: no date arithmetic that can overflow, however large the
  grant or small the burn), ``not_burning`` when nothing burns, ``beyond_horizon``
  past ten years when the allocation has no end, ``exhausted`` when nothing remains;
- overdrawn = charged more than granted (e.g. after an import of direct jobs);
- elapsed = (today − start) / (end − start), from the allocation's dates or else
  the project's; under-used when elapsed ≥ 25 % and used < ``underuse_ratio`` ×
  elapsed (default: used less than half of what a linear burn would have used).
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from broker.auth import Principal
from broker.direct import Statement
from broker.errors import InvalidRequest
from broker.models import Allocation, Cluster, ImportedJob, Job, LedgerEntry, Membership, Project, User, UTCDateTime
from broker.schemas import MAX_DATE, MIN_DATE
from broker.services.common import find_user, require_role, to_units, today, visible_project_id

GROUP_KEYS = ("user", "cluster", "partition", "day", "month")
USAGE_KINDS = ("charge", "import")
UNDERUSE_MIN_ELAPSED = 0.25
SORT_KEYS = ("project", "cluster", "status", "percent_used", "used", "remaining", "reserved",
             "days_left", "burn_rate_per_day", "projected_exhaustion", "elapsed_percent")


@dataclass(frozen=True)
class UsageRow:
    """One group of usage: its keys (always ``project``), unit, amount and job count."""

    keys: dict[str, str]
    unit: str
    amount: float
    jobs: int


def parse_group_by(raw: str | None) -> list[str]:
    """``"user,day"`` → ``["user", "day"]``; unknown keys are a 422."""
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
    for day in (start, end):
        if day is not None and not MIN_DATE <= day <= MAX_DATE:
            raise InvalidRequest(f"Dates must lie between {MIN_DATE} and {MAX_DATE}.")
    lo = datetime.combine(start, time.min, UTC) if start else None
    hi = datetime.combine(end + timedelta(days=1), time.min, UTC) if end else None
    return lo, hi


def _period(dialect: str, column: Any, fmt: str) -> Any:
    """SQL expression formatting a timestamp as ``YYYY-MM-DD`` (day) or ``YYYY-MM`` (month)."""
    if dialect == "postgresql":
        return sa.func.to_char(column, "YYYY-MM-DD" if fmt == "day" else "YYYY-MM")
    return sa.func.strftime("%Y-%m-%d" if fmt == "day" else "%Y-%m", column)


def project_usage(
    session: Session, *, principal: Principal, code: str, group_by: list[str],
    start: date | None, end: date | None,
) -> list[UsageRow]:
    """Usage of one project the caller may see (member or quota manager)."""
    project_id = visible_project_id(session, principal, code)
    return usage_rows(session, project_ids=[project_id], group_by=group_by, start=start, end=end)


def usage_rows(
    session: Session, *, project_ids: list[int] | None, group_by: list[str],
    start: date | None, end: date | None,
) -> list[UsageRow]:
    """Charged usage grouped by project + ``group_by`` + unit, aggregated in SQL."""
    lo, hi = _bounds(start, end)
    keys = ["project", *group_by]
    projects = None if project_ids is None else "one" if len(project_ids) == 1 else "many"
    shape = (session.get_bind().dialect.name, tuple(group_by), projects, lo is not None, hi is not None)
    params: dict[str, Any] = {name: value for name, value in (("lo", lo), ("hi", hi)) if value is not None}
    found: Sequence[Any]
    if projects == "many":  # an expanding IN: rendered per run, so not a direct statement
        params["project_ids"] = project_ids
        found = session.connection().execute(_usage_statement(*shape), params).all()
    else:
        if project_ids is not None:
            params["project_id"] = project_ids[0]
        found = _direct_usage_statement(*shape).rows(session, params)
    rows: list[UsageRow] = []
    for *values, unit, amount, jobs in found:
        rows.append(UsageRow(dict(zip(keys, (str(v) for v in values), strict=True)), unit,
                             to_units(int(amount or 0)) or 0.0, int(jobs)))
    rows.sort(key=lambda r: (*(r.keys[k] for k in keys), r.unit))
    return rows


#: report shapes kept built: the group keys' orders alone make hundreds of shapes a
#: caller could ask for, and an unbounded cache would keep every one of them
USAGE_STATEMENTS_KEPT = 256


@functools.lru_cache(maxsize=USAGE_STATEMENTS_KEPT)
def _usage_statement(dialect: str, group_by: tuple[str, ...], projects: str | None, since: bool,
                     until: bool) -> Any:
    """The usage query for one shape of report (values are parameters: ``:project_id``
    or ``:project_ids``, ``:lo``, ``:hi``), built once on the tables' columns: building
    it cost more CPU than running it, and plain Core skips the ORM's layers."""
    le = LedgerEntry.__table__.c  # type: ignore[attr-defined]
    allocations, projects_t, clusters, users, imported, jobs = (
        t.__table__ for t in (Allocation, Project, Cluster, User, ImportedJob, Job))  # type: ignore[union-attr]
    exprs: dict[str, Any] = {
        "project": projects_t.c.code,
        "user": sa.func.coalesce(users.c.name, imported.c.username.concat(" (unmapped)"), "-"),
        "cluster": clusters.c.name,
        "partition": sa.func.coalesce(jobs.c.partition, imported.c.partition, "-"),
        "day": _period(dialect, le.occurred_at, "day"),
        "month": _period(dialect, le.occurred_at, "month"),
    }
    keys = ["project", *group_by]
    labelled = [exprs[k].label(f"k_{k}") for k in keys]
    # jobs, not ledger rows: an array job has one charge row per task
    job_count = sa.func.count(sa.distinct(sa.func.coalesce(le.job_id, "i" + sa.cast(le.imported_job_id, sa.String))))
    q = (sa.select(*labelled, allocations.c.unit.label("unit"), sa.func.sum(le.amount), job_count)
         .select_from(LedgerEntry.__table__)  # type: ignore[attr-defined]
         .join(allocations, allocations.c.id == le.allocation_id)
         .join(projects_t, projects_t.c.id == le.project_id)
         # one bound value per kind, not an expanding IN (rendered per run): the
         # statement is then fixed text, run on the driver's cursor (_direct_usage_statement)
         .where(le.kind.in_([sa.literal(kind) for kind in USAGE_KINDS])))
    if "cluster" in keys:
        q = q.join(clusters, clusters.c.id == allocations.c.cluster_id)
    if "user" in keys:
        q = q.outerjoin(users, users.c.id == le.user_id)
    if "user" in keys or "partition" in keys:
        q = q.outerjoin(imported, imported.c.id == le.imported_job_id)
    if "partition" in keys:
        q = q.outerjoin(jobs, jobs.c.id == le.job_id)
    if projects == "one":
        q = q.where(le.project_id == sa.bindparam("project_id"))
    elif projects == "many":
        q = q.where(le.project_id.in_(sa.bindparam("project_ids", expanding=True)))
    if since:
        q = q.where(le.occurred_at >= sa.bindparam("lo", type_=UTCDateTime))
    if until:
        q = q.where(le.occurred_at < sa.bindparam("hi", type_=UTCDateTime))
    return q.group_by(*(exprs[k] for k in keys), allocations.c.unit)


@functools.lru_cache(maxsize=USAGE_STATEMENTS_KEPT)
def _direct_usage_statement(dialect: str, group_by: tuple[str, ...], projects: str | None, since: bool,
                            until: bool) -> Statement:
    """:func:`_usage_statement` run on the driver's cursor on PostgreSQL (broker/direct.py)."""
    return Statement(_usage_statement(dialect, group_by, projects, since, until))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text: one that would start a formula (``=``, ``+``,
    ``-``, ``@``, tab, CR; e.g. a project title ``=HYPERLINK(...)``) gets a leading ``'``.
    Numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.match(value):
        return "'" + value
    return value


def _csv(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([csv_cell(h) for h in header])
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])
    return out.getvalue()


def rows_to_csv(rows: list[UsageRow], group_by: list[str]) -> str:
    """CSV with a header: project, the group keys, unit, amount, jobs (formula-safe)."""
    return _csv(["project", *group_by, "unit", "amount", "jobs"],
                ([r.keys["project"], *(r.keys[k] for k in group_by), r.unit, f"{r.amount:.6f}", r.jobs]
                 for r in rows))


def totals_by_unit(rows: list[UsageRow]) -> dict[str, float]:
    """Sum of ``rows`` per unit."""
    totals: dict[str, float] = {}
    for r in rows:
        totals[r.unit] = round(totals.get(r.unit, 0.0) + r.amount, 6)
    return totals


# --- portfolio: balances, burn rate, projections --------------------------------------------

def portfolio(session: Session, *, principal: Principal, window_days: int = 14) -> list[dict[str, object]]:
    """Quota managers: every allocation with balances, burn rate and projected exhaustion."""
    require_role(principal, "quota_manager")
    return allocation_summaries(session, project_ids=None, window_days=window_days)


def my_budget(session: Session, *, principal: Principal, window_days: int = 14) -> list[dict[str, Any]]:
    """The caller's own projects (memberships, whatever their global roles): each
    allocation with granted, used, reserved, remaining, burn rate and projected
    exhaustion — what ``aifa-broker budget`` prints."""
    me = find_user(session, principal.name)
    if me is None:
        return []
    roles = {code: role for code, role in session.exec(
        select(Project.code, Membership.role).join(Membership, col(Membership.project_id) == col(Project.id))
        .where(Membership.user_id == me.id)).all()}
    ids = [int(i) for i in session.exec(select(Membership.project_id).where(Membership.user_id == me.id)).all()]
    if not ids:
        return []
    rows = allocation_summaries(session, project_ids=ids, window_days=window_days)
    return [{**row, "role": roles.get(row["project"])} for row in rows]


def allocation_summaries(
    session: Session, *, project_ids: list[int] | None, window_days: int = 14,
    as_of: date | None = None, underuse_ratio: float = 0.5,
) -> list[dict[str, Any]]:
    """One summary per allocation (of ``project_ids``, or all); see the module docstring."""
    day = as_of or today()
    since = datetime.combine(day - timedelta(days=window_days - 1), time.min, UTC)
    until = datetime.combine(day + timedelta(days=1), time.min, UTC)
    le = LedgerEntry.__table__.c  # type: ignore[attr-defined]
    burned_q = (sa.select(le.allocation_id, sa.func.sum(le.amount))
                .where(le.kind.in_(USAGE_KINDS), le.occurred_at >= since, le.occurred_at < until)
                .group_by(le.allocation_id))
    if project_ids is not None:
        burned_q = burned_q.where(le.project_id.in_(project_ids))
    burned = {int(a): int(s or 0) for a, s in session.execute(burned_q).all()}
    # the cluster's name only: a whole cluster row (connection, partitions, cost model
    # as JSON) was decoded again for every one of its allocations
    q = (select(Allocation, Project, Cluster.name)
         .join(Project, col(Project.id) == col(Allocation.project_id))
         .join(Cluster, col(Cluster.id) == col(Allocation.cluster_id))
         .order_by(col(Project.code), col(Allocation.id)))
    if project_ids is not None:
        q = q.where(col(Allocation.project_id).in_(project_ids))
    return [_summary(alloc, project, cluster, burned.get(alloc.id or 0, 0), day, window_days, underuse_ratio)
            for alloc, project, cluster in session.exec(q).all()]


FORECAST_HORIZON_DAYS = 3653  # ten years: "when" beyond that is not a useful date


@dataclass(frozen=True)
class Forecast:
    """When an allocation runs out at the current burn rate (see the module docstring)."""

    exhaustion: date | None
    status: str  # exhausted | before_end | not_before_end | not_burning | beyond_horizon


def forecast(*, day: date, granted: int, remaining: int, per_day: float, end: date | None) -> Forecast:
    """Project the exhaustion date without date arithmetic that can overflow: the
    number of days is compared with the days left before any date is built."""
    if remaining <= 0:
        return Forecast(day if granted > 0 else None, "exhausted")
    if not per_day > 0:  # also catches NaN
        return Forecast(None, "not_burning")
    days_needed = remaining / per_day  # may be astronomically large (tiny burn rate)
    if end is not None and days_needed >= (end - day).days:
        return Forecast(None, "not_before_end")
    if days_needed > min(FORECAST_HORIZON_DAYS, (date.max - day).days):
        return Forecast(None, "beyond_horizon")
    return Forecast(day + timedelta(days=int(days_needed)), "before_end")


def _summary(alloc: Allocation, project: Project, cluster: str, burned: int, day: date,
             window_days: int, underuse_ratio: float) -> dict[str, Any]:
    remaining = alloc.granted - alloc.charged - alloc.reserved
    start = alloc.start_date or project.start_date
    end = alloc.end_date or project.end_date
    existed = window_days if start is None else min(window_days, max(1, (day - start).days + 1))
    per_day = burned / existed
    outlook = forecast(day=day, granted=alloc.granted, remaining=remaining, per_day=per_day, end=end)
    exhaustion = outlook.exhaustion
    elapsed: float | None = None
    if start and end and end > start:
        elapsed = min(1.0, max(0.0, (day - start).days / (end - start).days))
    used_fraction = alloc.charged / alloc.granted if alloc.granted else None
    underused = (elapsed is not None and used_fraction is not None and elapsed >= UNDERUSE_MIN_ELAPSED
                 and used_fraction < underuse_ratio * elapsed)
    return {
        "project": project.code, "title": project.title, "status": project.status,
        "access_mode": project.access_mode, "cluster": cluster,
        "allocation_id": alloc.id, "account": alloc.account, "unit": alloc.unit,
        "granted": to_units(alloc.granted), "used": to_units(alloc.charged),
        "reserved": to_units(alloc.reserved), "remaining": to_units(remaining),
        "percent_used": round(100 * alloc.charged / alloc.granted, 2) if alloc.granted else None,
        "percent_committed": round(100 * (alloc.charged + alloc.reserved) / alloc.granted, 2)
        if alloc.granted else None,
        "window_days": window_days, "used_in_window": to_units(burned),
        "burn_rate_per_day": to_units(round(per_day)),
        "projected_exhaustion": exhaustion.isoformat() if exhaustion else None,
        "forecast": outlook.status,
        "runs_out_before_end": bool(exhaustion and end and exhaustion < end),
        "overdrawn": alloc.charged > alloc.granted,
        "start_date": start, "end_date": end,
        "days_left": (end - day).days if end else None,
        "elapsed_percent": None if elapsed is None else round(100 * elapsed, 1),
        "underused": underused, "thresholds": list(alloc.thresholds),
    }


def filter_portfolio(
    rows: list[dict[str, Any]], *, status: str | None = None, cluster: str | None = None,
    q: str | None = None, min_used: float | None = None, max_used: float | None = None,
    max_days_left: int | None = None, underused: bool | None = None,
    sort: str = "project", descending: bool = False,
) -> list[dict[str, Any]]:
    """Filter and sort portfolio rows (server side: the dashboard works without JavaScript).

    Rows without a value for the sort key (e.g. no end date → no ``days_left``) come last.
    """
    if sort not in SORT_KEYS:
        raise InvalidRequest(f"Unknown sort key {sort!r} (use {', '.join(SORT_KEYS)}).")
    needle = (q or "").strip().lower()
    out = []
    for r in rows:
        pct = r["percent_used"]
        if status and r["status"] != status:
            continue
        if cluster and r["cluster"] != cluster:
            continue
        if needle and needle not in r["project"].lower() and needle not in r["title"].lower():
            continue
        if min_used is not None and (pct is None or pct < min_used):
            continue
        if max_used is not None and (pct is None or pct > max_used):
            continue
        if max_days_left is not None and (r["days_left"] is None or r["days_left"] > max_days_left):
            continue
        if underused is not None and r["underused"] != underused:
            continue
        out.append(r)
    present = [r for r in out if r[sort] is not None]
    missing = [r for r in out if r[sort] is None]
    present.sort(key=lambda r: (r[sort], r["project"], r["allocation_id"]), reverse=descending)
    return present + missing


def portfolio_csv(rows: list[dict[str, Any]]) -> str:
    """The portfolio as CSV (one line per allocation; formula-safe)."""
    columns = ["project", "title", "status", "cluster", "account", "unit", "granted", "used", "reserved",
               "remaining", "percent_used", "burn_rate_per_day", "projected_exhaustion", "start_date",
               "end_date", "days_left", "elapsed_percent", "underused"]
    return _csv(columns, (["" if r[c] is None else r[c] for c in columns] for r in rows))


# --- burn-down of one allocation --------------------------------------------------------------

MAX_SERIES_DAYS = 1100


def burndown(session: Session, alloc: Allocation, *, window_days: int = 14,
             as_of: date | None = None, project: Project | None = None) -> dict[str, Any]:
    """Daily series for a burn-down chart: granted, cumulative used, projected.

    ``used[i]`` is the cumulative usage at the end of ``labels[i]``; ``projected``
    continues from today at the window's burn rate until the end date (or 90 days),
    capped at the granted amount; it is ``None`` before today.
    """
    day = as_of or today()
    le = LedgerEntry.__table__.c  # type: ignore[attr-defined]
    per_day: dict[str, dict[str, int]] = {"used": {}, "granted": {}}
    # the initial grant counts from the first day of the series; adjustments from the day they were made
    for series, kinds, column in (("used", USAGE_KINDS, le.occurred_at), ("granted", ("adjust",), le.created_at)):
        label = _period(session.get_bind().dialect.name, column, "day")
        for d, total in session.execute(
            sa.select(label, sa.func.sum(le.amount)).where(le.allocation_id == alloc.id, le.kind.in_(kinds))
            .group_by(label)
        ).all():
            per_day[series][str(d)] = int(total or 0)
    known = sorted({*per_day["used"], *per_day["granted"]})
    start = alloc.start_date or (project.start_date if project else None) \
        or (date.fromisoformat(known[0]) if known else day)
    end = alloc.end_date or (project.end_date if project else None)
    last = max(day, end or day + timedelta(days=90))
    if known:
        start = min(start, date.fromisoformat(known[0]))
        last = max(last, date.fromisoformat(known[-1]))
    # the series always shows today; a far end date is cut (and never reaches date.max)
    last = min(last, day + timedelta(days=MAX_SERIES_DAYS))
    if (last - start).days > MAX_SERIES_DAYS:
        start = last - timedelta(days=MAX_SERIES_DAYS)
    labels: list[str] = []
    used: list[float | None] = []
    granted: list[float] = []
    projected: list[float | None] = []
    before = {s: sum(v for d, v in per_day[s].items() if d < start.isoformat()) for s in per_day}
    before["granted"] += int(session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(le.amount), 0)).where(le.allocation_id == alloc.id,
                                                                     le.kind == "grant")).scalar() or 0)
    cum_used, cum_granted = before["used"], before["granted"]
    declared_start = alloc.start_date or (project.start_date if project else None)
    rate = _window_rate(session, alloc, day, window_days, declared_start)
    used_today = before["used"] + sum(v for d, v in per_day["used"].items()
                                      if start.isoformat() <= d <= day.isoformat())
    d = start
    while d <= last:
        key = d.isoformat()
        cum_granted += per_day["granted"].get(key, 0)
        cum_used += per_day["used"].get(key, 0)
        labels.append(key)
        granted.append(to_units(cum_granted) or 0.0)
        used.append(to_units(cum_used) if d <= day else None)
        if d < day:
            projected.append(None)
        else:
            future = used_today + rate * (d - day).days
            projected.append(to_units(min(int(future), max(cum_granted, 0))))
        d += timedelta(days=1)
    remaining = alloc.granted - alloc.charged - alloc.reserved
    outlook = forecast(day=day, granted=alloc.granted, remaining=remaining, per_day=rate, end=end)
    return {"allocation_id": alloc.id, "unit": alloc.unit, "labels": labels, "granted": granted,
            "used": used, "projected": projected, "today": day.isoformat(),
            "burn_rate_per_day": to_units(round(rate)),
            "projected_exhaustion": outlook.exhaustion.isoformat() if outlook.exhaustion else None,
            "forecast": outlook.status}


def _window_rate(session: Session, alloc: Allocation, day: date, window_days: int, start: date | None) -> float:
    since = datetime.combine(day - timedelta(days=window_days - 1), time.min, UTC)
    until = datetime.combine(day + timedelta(days=1), time.min, UTC)
    le = LedgerEntry.__table__.c  # type: ignore[attr-defined]
    burned = session.execute(
        sa.select(sa.func.sum(le.amount)).where(le.allocation_id == alloc.id, le.kind.in_(USAGE_KINDS),
                                                le.occurred_at >= since, le.occurred_at < until)
    ).scalar()
    existed = window_days if start is None else min(window_days, max(1, (day - start).days + 1))
    return int(burned or 0) / existed


# --- project detail: recent jobs and ledger ---------------------------------------------------------

def recent_jobs(session: Session, project_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The project's newest jobs (broker-submitted)."""
    rows = session.exec(
        select(Job, User.name, Cluster.name)
        .join(User, col(User.id) == col(Job.user_id))
        .join(Cluster, col(Cluster.id) == col(Job.cluster_id))
        .where(Job.project_id == project_id).order_by(col(Job.created_at).desc()).limit(limit)
    ).all()
    return [{"id": j.id, "name": j.name, "user": u, "cluster": c, "partition": j.partition, "state": j.state,
             "unit": j.unit, "estimated": to_units(j.estimated), "charged": to_units(j.charged),
             "created_at": j.created_at, "ended_at": j.ended_at} for j, u, c in rows]


def ledger_entries(session: Session, project_id: int, *, kinds: tuple[str, ...] | None = None,
                   limit: int = 50) -> list[dict[str, Any]]:
    """The project's newest ledger entries (``kinds`` to restrict, e.g. grants and adjustments)."""
    q = (select(LedgerEntry, Allocation.unit, Cluster.name)
         .join(Allocation, col(Allocation.id) == col(LedgerEntry.allocation_id))
         .join(Cluster, col(Cluster.id) == col(Allocation.cluster_id))
         .where(LedgerEntry.project_id == project_id))
    if kinds:
        q = q.where(col(LedgerEntry.kind).in_(kinds))
    rows = session.exec(q.order_by(col(LedgerEntry.created_at).desc(), col(LedgerEntry.id).desc())
                        .limit(limit)).all()
    return [{"id": e.id, "kind": e.kind, "amount": to_units(e.amount), "unit": unit, "cluster": cluster,
             "allocation_id": e.allocation_id, "job_id": e.job_id, "actor": e.actor, "reason": e.reason,
             "created_at": e.created_at, "occurred_at": e.occurred_at} for e, unit, cluster in rows]
