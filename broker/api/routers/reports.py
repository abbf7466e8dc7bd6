"""/v1 usage reports beyond the core endpoints: cross-project usage, the filtered
portfolio, burn-down series, and threshold/expiry notifications."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from sqlmodel import col, select

from broker.api.deps import PrincipalDep, SessionDep
from broker.api.responses import json_data
from broker.api.routers.projects import FromDate, ToDate
from broker.api.unit_of_work import UnitOfWorkRoute
from broker.models import Allocation
from broker.services import notifications as notes
from broker.services import usage as usage_svc
from broker.services.common import require_role, visible_project

router = APIRouter(prefix="/v1", tags=["usage"], route_class=UnitOfWorkRoute)

WindowDays = Annotated[int, Query(ge=1, le=365)]


def _wants_csv(request: Request, fmt: str | None) -> bool:
    return fmt == "csv" or "text/csv" in request.headers.get("accept", "")


@router.get("/usage/report", response_model=None)
def usage_report(
    request: Request, principal: PrincipalDep, session: SessionDep,
    group_by: Annotated[str | None, Query(max_length=100)] = None,
    from_: FromDate = None,
    to: ToDate = None,
    format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None,
) -> Any:
    """Quota managers: usage of all projects grouped by project + ``user,cluster,partition,day,month``."""
    require_role(principal, "quota_manager")
    keys = usage_svc.parse_group_by(group_by)
    rows = usage_svc.usage_rows(session, project_ids=None, group_by=keys, start=from_, end=to)
    if _wants_csv(request, format):
        return Response(usage_svc.rows_to_csv(rows, keys), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="usage.csv"'})
    return json_data({"group_by": keys, "from": from_, "to": to, "totals": usage_svc.totals_by_unit(rows),
                      "rows": [{**r.keys, "unit": r.unit, "amount": r.amount, "jobs": r.jobs} for r in rows]})


@router.get("/usage/allocations", response_model=None)
def usage_allocations(
    request: Request, principal: PrincipalDep, session: SessionDep,
    window_days: WindowDays = 14,
    status: Annotated[str | None, Query(max_length=16)] = None,
    cluster: Annotated[str | None, Query(max_length=64)] = None,
    q: Annotated[str | None, Query(max_length=100)] = None,
    min_used: Annotated[float | None, Query(ge=0, le=1e15, allow_inf_nan=False)] = None,
    max_used: Annotated[float | None, Query(ge=0, le=1e15, allow_inf_nan=False)] = None,
    max_days_left: Annotated[int | None, Query(ge=-100_000, le=100_000)] = None,
    underused: bool | None = None,
    sort: Annotated[str, Query(max_length=32)] = "project",
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
    format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None,
) -> Any:
    """Quota managers: the portfolio filtered and sorted (as the dashboard shows it)."""
    require_role(principal, "quota_manager")
    rows = usage_svc.filter_portfolio(
        usage_svc.allocation_summaries(session, project_ids=None, window_days=window_days),
        status=status, cluster=cluster, q=q, min_used=min_used, max_used=max_used,
        max_days_left=max_days_left, underused=underused, sort=sort, descending=order == "desc")
    if _wants_csv(request, format):
        return Response(usage_svc.portfolio_csv(rows), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="portfolio.csv"'})
    return json_data({"window_days": window_days, "allocations": rows})


@router.get("/budget", response_model=dict[str, Any])
def my_budget(principal: PrincipalDep, session: SessionDep, window_days: WindowDays = 14) -> Response:
    """The caller's projects: every allocation's granted, used, reserved and remaining
    amounts, burn rate over ``window_days`` and projected exhaustion."""
    return json_data({"user": principal.name, "window_days": window_days,
                      "allocations": usage_svc.my_budget(session, principal=principal, window_days=window_days)})


@router.get("/projects/{code}/burndown")
def project_burndown(code: str, principal: PrincipalDep, session: SessionDep,
                     window_days: WindowDays = 14) -> dict[str, Any]:
    """Members / quota managers: daily granted, cumulative used and projected, per allocation."""
    project, _ = visible_project(session, principal, code)
    allocs = session.exec(select(Allocation).where(Allocation.project_id == project.id)
                          .order_by(col(Allocation.id))).all()
    return {"project": code, "window_days": window_days,
            "allocations": [usage_svc.burndown(session, a, window_days=window_days, project=project)
                            for a in allocs]}


@router.get("/notifications")
def list_notifications(
    principal: PrincipalDep, session: SessionDep,
    project: Annotated[str | None, Query(max_length=64)] = None,
    kind: Annotated[str | None, Query(pattern="^(threshold|expiry)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Threshold crossings and expiry warnings with their webhook deliveries
    (quota managers: all projects; others: their own projects)."""
    return {"notifications": notes.list_notifications(session, principal=principal, project=project,
                                                       kind=kind, limit=limit)}


@router.get("/projects/{code}/notifications")
def project_notifications(code: str, principal: PrincipalDep, session: SessionDep,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """One project's notifications (members and quota managers)."""
    return {"project": code,
            "notifications": notes.list_notifications(session, principal=principal, project=code, limit=limit)}
