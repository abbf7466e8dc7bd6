"""Projects, allocations and memberships (quota managers; PIs manage members)."""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from datetime import date
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from broker.auth import Principal
from broker.direct import Statement
from broker.errors import Conflict, Forbidden, InvalidRequest, NotFound
from broker.models import Allocation, Cluster, Membership, Project, User, pk
from broker.schemas import (
    AllocationIn,
    AllocationOut,
    AllocationPatch,
    MemberIn,
    MemberOut,
    ProjectIn,
    ProjectOut,
    ProjectPatch,
)
from broker.services import ledger, sessions
from broker.services.common import (
    find_user,
    get_cluster,
    get_or_create_user,
    require_role,
    to_micro,
    to_units,
    visible_project,
)


def allocation_out(alloc: Allocation, cluster_name: str) -> AllocationOut:
    remaining = alloc.granted - alloc.charged - alloc.reserved
    return AllocationOut(
        id=alloc.id or 0, cluster=cluster_name, unit=alloc.unit, account=alloc.account,
        granted=to_units(alloc.granted) or 0.0, charged=to_units(alloc.charged) or 0.0,
        reserved=to_units(alloc.reserved) or 0.0, remaining=to_units(remaining) or 0.0,
        start_date=alloc.start_date, end_date=alloc.end_date, thresholds=list(alloc.thresholds),
    )


def project_out(session: Session, project: Project) -> ProjectOut:
    return project_outs(session, [project])[0]


def project_outs(session: Session, projects: Sequence[Project], *, every: bool = False) -> list[ProjectOut]:
    """The answers for ``projects`` in two more queries, however many there are
    (``every``: they are all the projects, so no id filter)."""
    ids = [pk(p) for p in projects]
    allocs_q = (select(Allocation, Cluster.name).join(Cluster, Cluster.id == Allocation.cluster_id)  # type: ignore[arg-type]
                .order_by(col(Allocation.id)))
    members_q = (select(Membership.project_id, Membership.role, User.name)
                 .join(User, User.id == Membership.user_id).order_by(col(User.name)))  # type: ignore[arg-type]
    if not every:
        allocs_q = allocs_q.where(col(Allocation.project_id).in_(ids))
        members_q = members_q.where(col(Membership.project_id).in_(ids))
    allocs: dict[int, list[AllocationOut]] = {i: [] for i in ids}
    for a, cluster in session.exec(allocs_q).all():
        allocs.setdefault(a.project_id, []).append(allocation_out(a, cluster))
    members: dict[int, list[MemberOut]] = {i: [] for i in ids}
    for project_id, role, name in session.exec(members_q).all():
        members.setdefault(project_id, []).append(MemberOut(user=name, role=role))
    return [ProjectOut(code=p.code, title=p.title, status=p.status, access_mode=p.access_mode,
                       start_date=p.start_date, end_date=p.end_date, attributes=p.attributes,
                       allocations=allocs[pk(p)], members=members[pk(p)]) for p in projects]


def check_access_mode(mode: str | None, known: Collection[str] | None) -> None:
    """An access mode must be a configured one (an unknown mode would silently mean
    "no limits"); ``known`` None skips the check (internal callers)."""
    if mode is not None and known is not None and mode not in known:
        raise InvalidRequest(f"Unknown access_mode {mode!r}: the configured modes are {', '.join(known)}.")


def create_project(session: Session, *, principal: Principal | None, body: ProjectIn,
                   access_modes: Collection[str] | None = None) -> Project:
    """Create a project; ``access_modes``: the configured modes its mode must be one of."""
    if principal is not None:
        require_role(principal, "quota_manager")
    check_access_mode(body.access_mode, access_modes)
    if session.exec(select(Project).where(Project.code == body.code)).first():
        raise Conflict(f"Project {body.code} exists already.")
    project = Project(**body.model_dump())
    session.add(project)
    session.flush()
    return project


def update_project(session: Session, *, principal: Principal, code: str, body: ProjectPatch,
                   access_modes: Collection[str] | None = None) -> Project:
    require_role(principal, "quota_manager")
    check_access_mode(body.access_mode, access_modes)
    project, _ = visible_project(session, principal, code)
    for key, value in body.model_dump(exclude_unset=True).items():
        setattr(project, key, value)
    if project.start_date and project.end_date and project.end_date < project.start_date:
        raise InvalidRequest("end_date is before start_date")
    session.add(project)
    return project


def list_project_answers(session: Session, *, principal: Principal) -> list[dict[str, Any]]:
    """The projects the caller may see (member of; quota managers: all), by code, as
    JSON-ready data with the fields and values of their :class:`ProjectOut` (what
    ``GET /v1/projects`` answers; tests/integration/test_read_answers.py compares it
    with the models' JSON). Three statements built once, read as plain rows: no ORM
    objects, no model validated per project, allocation and member; on PostgreSQL run
    on the driver's cursor (broker/direct.py)."""
    projects_q, allocs_q, members_q = _listing_statements(principal.is_quota_manager)
    params = {"me": principal.name}
    allocs: dict[int, list[dict[str, Any]]] = {}
    for project_id, *alloc in allocs_q.rows(session, params):
        allocs.setdefault(project_id, []).append(_allocation_answer(*alloc))
    members: dict[int, list[dict[str, str]]] = {}
    for project_id, name, role in members_q.rows(session, params):
        members.setdefault(project_id, []).append({"user": name, "role": role})
    return [{"code": code, "title": title, "status": status, "access_mode": mode, "start_date": start,
             "end_date": end, "attributes": attributes, "allocations": allocs.get(pid, []),
             "members": members.get(pid, [])}
            for pid, code, title, status, mode, start, end, attributes in projects_q.rows(session, params)]


def _allocation_answer(alloc_id: int, cluster: str, unit: str, account: str, granted: int, charged: int,
                       reserved: int, start: date | None, end: date | None, thresholds: list[float]) -> dict[str, Any]:
    """An allocation as :func:`allocation_out` answers it, as data (its thresholds as
    floats, as the model holds them)."""
    return {"id": alloc_id, "cluster": cluster, "unit": unit, "account": account,
            "granted": to_units(granted) or 0.0, "charged": to_units(charged) or 0.0,
            "reserved": to_units(reserved) or 0.0, "remaining": to_units(granted - charged - reserved) or 0.0,
            "start_date": start, "end_date": end, "thresholds": [float(t) for t in thresholds], "warnings": []}


@functools.cache
def _listing_statements(every: bool) -> tuple[Statement, Statement, Statement]:
    """The project listing's statements for a quota manager (``every``) or a member
    (``:me``), on the tables' columns: built once, and run without the ORM (no
    compile or row processing per execution)."""
    projects, allocations, clusters, members, users = (
        t.__table__ for t in (Project, Allocation, Cluster, Membership, User))  # type: ignore[union-attr]
    projects_q = sa.select(projects.c.id, projects.c.code, projects.c.title, projects.c.status,
                           projects.c.access_mode, projects.c.start_date, projects.c.end_date,
                           projects.c.attributes).order_by(projects.c.code)
    allocs_q = (sa.select(allocations.c.project_id, allocations.c.id, clusters.c.name, allocations.c.unit,
                          allocations.c.account, allocations.c.granted, allocations.c.charged,
                          allocations.c.reserved, allocations.c.start_date, allocations.c.end_date,
                          allocations.c.thresholds)
                .join(clusters, clusters.c.id == allocations.c.cluster_id).order_by(allocations.c.id))
    members_q = (sa.select(members.c.project_id, users.c.name, members.c.role)
                 .join(users, users.c.id == members.c.user_id).order_by(users.c.name))
    if not every:
        # the caller's projects, as a subquery of its own tables (not correlated with the
        # membership and user rows the member listing joins)
        mine_m, mine_u = members.alias("mine"), users.alias("me")
        mine = (sa.select(mine_m.c.project_id).join(mine_u, mine_u.c.id == mine_m.c.user_id)
                .where(mine_u.c.name == sa.bindparam("me")))
        projects_q, allocs_q, members_q = (projects_q.where(projects.c.id.in_(mine)),
                                           allocs_q.where(allocations.c.project_id.in_(mine)),
                                           members_q.where(members.c.project_id.in_(mine)))
    return Statement(projects_q), Statement(allocs_q), Statement(members_q)


def grant_allocation(
    session: Session, *, principal: Principal | None, code: str, body: AllocationIn, actor: str,
) -> Allocation:
    """Create an allocation and write its ``grant`` ledger entry."""
    if principal is not None:
        require_role(principal, "quota_manager")
        project, _ = visible_project(session, principal, code)
    else:
        project = _project(session, code)
    cluster = get_cluster(session, body.cluster)
    _refuse_shared_account(session, project, cluster, account=body.account, start=body.start_date,
                           end=body.end_date)
    alloc = Allocation(
        project_id=pk(project), cluster_id=pk(cluster), unit=body.unit, granted=0,
        start_date=body.start_date, end_date=body.end_date, account=body.account,
        thresholds=body.thresholds if body.thresholds is not None else [80.0, 95.0, 100.0],
    )
    session.add(alloc)
    session.flush()
    ledger.apply(session, allocation=alloc, kind="grant", amount=to_micro(body.amount), actor=actor,
                 reason="initial grant")
    session.refresh(alloc)
    return alloc


def _refuse_shared_account(session: Session, project: Project, cluster: Cluster, *, account: str,
                           start: date | None, end: date | None) -> None:
    """Two projects cannot share one Slurm account on one scheduler over overlapping
    dates: their direct jobs (imported from accounting) could not be told apart.
    Refused (409) rather than warned: a wrong attribution spends another project's
    budget. A project may hold several allocations on its own account (renewals),
    and an account may be reused once the other project's allocation has ended."""
    from broker.services.clusters import scheduler_group_ids

    start = start or project.start_date
    end = end or project.end_date
    rows = session.exec(
        select(Allocation, Project, Cluster).join(Project, col(Project.id) == col(Allocation.project_id))
        .join(Cluster, col(Cluster.id) == col(Allocation.cluster_id))
        .where(col(Allocation.cluster_id).in_(scheduler_group_ids(session, cluster)),
               Allocation.account == account, Allocation.project_id != project.id)
    ).all()
    for other, other_project, other_cluster in rows:
        o_start = other.start_date or other_project.start_date
        o_end = other.end_date or other_project.end_date
        if (end is None or o_start is None or o_start <= end) and (o_end is None or start is None or start <= o_end):
            raise Conflict(
                f"Slurm account {account!r} on {other_cluster.name} is already used by project "
                f"{other_project.code} (allocation {other.id}) over overlapping dates: direct jobs of two "
                "projects on one account cannot be told apart. Give each project its own Slurm account.")


def adjust_allocation(
    session: Session, *, principal: Principal | None, code: str, allocation_id: int, body: AllocationPatch,
    actor: str | None = None,
) -> Allocation:
    """Change an allocation; a new ``amount`` becomes an ``adjust`` entry of the difference.

    The new amount may not go below what is already charged plus reserved.
    ``principal`` None: the operator CLI (``actor`` names it in the ledger)."""
    if principal is not None:
        require_role(principal, "quota_manager")
        project, _ = visible_project(session, principal, code)
    else:
        project = _project(session, code)
    alloc = session.get(Allocation, allocation_id)
    if alloc is None or alloc.project_id != project.id:
        raise NotFound(f"No allocation {allocation_id} in project {code}.")
    changes = body.model_dump(exclude_unset=True, exclude={"amount", "reason"})
    for key, value in changes.items():
        setattr(alloc, key, value)
    if changes.keys() & {"account", "start_date", "end_date"}:
        cluster = session.get(Cluster, alloc.cluster_id)
        assert cluster is not None
        _refuse_shared_account(session, project, cluster, account=alloc.account, start=alloc.start_date,
                               end=alloc.end_date)
    session.add(alloc)
    session.flush()
    if body.amount is not None:
        new = to_micro(body.amount)
        session.refresh(alloc, with_for_update=True)
        if new < alloc.charged + alloc.reserved:
            raise InvalidRequest("The new amount is below what is already charged and reserved.",
                                 code="validation_error")
        if new != alloc.granted:
            ledger.apply(session, allocation=alloc, kind="adjust", amount=new - alloc.granted,
                         actor=actor or (principal.name if principal else "cli"), reason=body.reason or "adjusted")
    session.refresh(alloc)
    return alloc


def add_member(session: Session, *, principal: Principal | None, code: str, body: MemberIn) -> MemberOut:
    """Add or update a membership (quota manager, or a PI of the project)."""
    if principal is not None:
        project, role = visible_project(session, principal, code)
        if not principal.is_quota_manager and role != "pi":
            raise Forbidden("Only a quota manager or the project's PI can manage members.")
    else:
        project = _project(session, code)
    user = get_or_create_user(session, body.user)
    member = session.exec(select(Membership).where(
        Membership.project_id == project.id, Membership.user_id == user.id)).first()
    if member is None:
        member = Membership(project_id=pk(project), user_id=pk(user), role=body.role)
    elif member.role != body.role:
        member.role = body.role
        sessions.revoke_user(session, user.name, "role_change")  # no page keeps the old role's view
    session.add(member)
    return MemberOut(user=user.name, role=body.role)


def remove_member(session: Session, *, principal: Principal, code: str, user_name: str) -> None:
    project, role = visible_project(session, principal, code)
    if not principal.is_quota_manager and role != "pi":
        raise Forbidden("Only a quota manager or the project's PI can manage members.")
    user = find_user(session, user_name)
    member = user and session.exec(select(Membership).where(
        Membership.project_id == project.id, Membership.user_id == user.id)).first()
    if not member:
        raise NotFound(f"{user_name} is not a member of {code}.")
    session.delete(member)
    sessions.revoke_user(session, user_name, "role_change")


def _project(session: Session, code: str) -> Project:
    project = session.exec(select(Project).where(Project.code == code)).first()
    if project is None:
        raise NotFound(f"No project {code}.")
    return project
