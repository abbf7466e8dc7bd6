"""/v1/projects: projects, allocations, members, usage."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from broker.api.deps import PrincipalDep, RegistryDep, SessionDep, SettingsDep
from broker.api.responses import json_data
from broker.api.unit_of_work import UnitOfWorkRoute
from broker.schemas import (
    MAX_DATE,
    MAX_ID,
    MIN_DATE,
    AllocationIn,
    AllocationOut,
    AllocationPatch,
    MemberIn,
    MemberOut,
    ProjectIn,
    ProjectOut,
    ProjectPatch,
)
from broker.services import clusters as cluster_svc
from broker.services import projects as svc
from broker.services import usage as usage_svc
from broker.services.common import require_role, visible_project
from broker.services.projects import allocation_out

#: usage windows: dates the broker can do arithmetic on (see broker.schemas.SupportedDate)
FromDate = Annotated[date | None, Query(alias="from", ge=MIN_DATE, le=MAX_DATE)]
ToDate = Annotated[date | None, Query(ge=MIN_DATE, le=MAX_DATE)]

router = APIRouter(prefix="/v1", tags=["projects"], route_class=UnitOfWorkRoute)


@router.get("/projects", response_model=list[ProjectOut])
def list_projects(principal: PrincipalDep, session: SessionDep) -> Response:
    return json_data(svc.list_project_answers(session, principal=principal))


@router.post("/projects", response_model=ProjectOut, status_code=201)
def create_project(body: ProjectIn, principal: PrincipalDep, session: SessionDep,
                   settings: SettingsDep) -> ProjectOut:
    return svc.project_out(session, svc.create_project(session, principal=principal, body=body,
                                                       access_modes=settings.known_access_modes))


@router.get("/projects/{code}", response_model=ProjectOut)
def get_project(code: str, principal: PrincipalDep, session: SessionDep) -> ProjectOut:
    project, _ = visible_project(session, principal, code)
    return svc.project_out(session, project)


@router.patch("/projects/{code}", response_model=ProjectOut)
def patch_project(code: str, body: ProjectPatch, principal: PrincipalDep, session: SessionDep,
                  settings: SettingsDep) -> ProjectOut:
    return svc.project_out(session, svc.update_project(session, principal=principal, code=code, body=body,
                                                       access_modes=settings.known_access_modes))


@router.post("/projects/{code}/allocations", response_model=AllocationOut, status_code=201)
def grant(code: str, body: AllocationIn, principal: PrincipalDep, session: SessionDep,
          registry: RegistryDep) -> AllocationOut:
    require_role(principal, "quota_manager")  # 403 / 404 before asking the cluster anything
    visible_project(session, principal, code)
    warning = cluster_svc.check_scheduler_account(session, registry=registry, cluster_name=body.cluster,
                                                  account=body.account)
    alloc = svc.grant_allocation(session, principal=principal, code=code, body=body, actor=principal.name)
    return allocation_out(alloc, body.cluster).model_copy(update={"warnings": [warning] if warning else []})


@router.patch("/projects/{code}/allocations/{allocation_id}", response_model=AllocationOut)
def adjust(code: str, allocation_id: Annotated[int, Path(ge=1, le=MAX_ID)], body: AllocationPatch,
           principal: PrincipalDep, session: SessionDep) -> AllocationOut:
    alloc = svc.adjust_allocation(session, principal=principal, code=code,
                                  allocation_id=allocation_id, body=body)
    project_view = svc.project_out(session, visible_project(session, principal, code)[0])
    return next(a for a in project_view.allocations if a.id == alloc.id)


@router.post("/projects/{code}/members", response_model=MemberOut, status_code=201)
def add_member(code: str, body: MemberIn, principal: PrincipalDep, session: SessionDep) -> MemberOut:
    return svc.add_member(session, principal=principal, code=code, body=body)


@router.delete("/projects/{code}/members/{user}", status_code=204)
def remove_member(code: str, user: str, principal: PrincipalDep, session: SessionDep) -> Response:
    svc.remove_member(session, principal=principal, code=code, user_name=user)
    return Response(status_code=204)


@router.get("/projects/{code}/usage", response_model=None)
def project_usage(
    code: str, request: Request, principal: PrincipalDep, session: SessionDep,
    group_by: Annotated[str | None, Query(max_length=100)] = None,
    from_: FromDate = None,
    to: ToDate = None,
    format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None,
) -> Any:
    """Charged usage, grouped by ``user,cluster,partition,day,month``; CSV with
    ``Accept: text/csv`` or ``format=csv``."""
    keys = usage_svc.parse_group_by(group_by)
    rows = usage_svc.project_usage(session, principal=principal, code=code, group_by=keys,
                                   start=from_, end=to)
    if format == "csv" or "text/csv" in request.headers.get("accept", ""):
        return Response(usage_svc.rows_to_csv(rows, keys), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{code}-usage.csv"'})
    totals: dict[str, float] = {}
    for r in rows:
        totals[r.unit] = round(totals.get(r.unit, 0.0) + r.amount, 6)
    return json_data({"project": code, "group_by": keys, "from": from_, "to": to, "totals": totals,
                      "rows": [{**r.keys, "unit": r.unit, "amount": r.amount, "jobs": r.jobs} for r in rows]})


@router.get("/usage")
def all_usage(principal: PrincipalDep, session: SessionDep,
              window_days: Annotated[int, Query(ge=1, le=365)] = 14) -> dict[str, Any]:
    """Quota managers: every allocation's balance, burn rate and projected exhaustion."""
    return {"window_days": window_days,
            "allocations": usage_svc.portfolio(session, principal=principal, window_days=window_days)}
