"""Small helpers shared by the services: amounts, lookups, visibility."""

from __future__ import annotations

import functools
from datetime import date
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from broker.auth import Principal
from broker.direct import Statement
from broker.errors import Forbidden, NotFound
from broker.models import MICRO, Cluster, Membership, Project, User, utcnow


def to_units(micro: int | None) -> float | None:
    """Micro-units → decimal units for the API."""
    return None if micro is None else round(micro / MICRO, 6)


def to_micro(units: float) -> int:
    return round(units * MICRO)


def today() -> date:
    return utcnow().date()


def get_or_create_user(session: Session, name: str, email: str | None = None) -> User:
    """The user named ``name``, created on first sight (tokens and enrolment)."""
    user = session.exec(select(User).where(User.name == name)).first()
    if user is None:
        user = User(name=name, email=email)
        session.add(user)
        session.flush()
    return user


def provision_user(session: Session, name: str, email: str | None = None) -> User:
    """The user named ``name``; created (``last_seen_at`` = first sight) when missing.

    An already-known user costs one read and no write. Two first requests of one
    new user may race: the loser's insert fails on the unique name inside a
    savepoint and it reads the winner's row."""
    user = find_user(session, name)
    if user is not None:
        return user
    try:
        with session.begin_nested():
            user = User(name=name, email=email, last_seen_at=utcnow())
            session.add(user)
    except IntegrityError:
        user = find_user(session, name)
        if user is None:
            raise
    return user


def find_user(session: Session, name: str) -> User | None:
    return session.exec(select(User).where(User.name == name)).first()


def get_cluster(session: Session, name: str) -> Cluster:
    cluster = session.exec(select(Cluster).where(Cluster.name == name)).first()
    if cluster is None:
        raise NotFound(f"No cluster named {name}.")
    return cluster


def membership_role(session: Session, project: Project, user: User | None) -> str | None:
    if user is None:
        return None
    m = session.exec(
        select(Membership).where(Membership.project_id == project.id, Membership.user_id == user.id)
    ).first()
    return m.role if m else None


def visible_project(session: Session, principal: Principal, code: str) -> tuple[Project, str | None]:
    """The project if the caller may see it (member or quota manager), else 404.

    Returns the project and the caller's project role (None for a non-member QM).
    """
    row = session.execute(_visible_project_statement(), {"code": code, "me": principal.name}).first()
    project, role = _visible(row, principal, code)
    return project, role


def visible_project_id(session: Session, principal: Principal, code: str) -> int:
    """:func:`visible_project` for a read that needs only the project's id: one plain
    row, no ORM object loaded."""
    row = _visible_project_id_statement().first(session, {"code": code, "me": principal.name})
    project_id, _ = _visible(row, principal, code)
    return int(project_id)


def _visible(row: Any, principal: Principal, code: str) -> tuple[Any, str | None]:
    """The one rule: a project is visible to its members and to quota managers; 404 otherwise."""
    if row is None:
        raise NotFound(f"No project {code}.")
    project, role = row
    if role is None and not principal.is_quota_manager:
        raise NotFound(f"No project {code}.")
    return project, role


@functools.cache
def _visible_project_statement() -> Any:
    """The project by code with the caller's role in it, one statement (built once)."""
    return _project_and_role(Project)


@functools.cache
def _visible_project_id_statement() -> Statement:
    """The same for the project's id alone, on the tables' columns, run on the driver's
    cursor on PostgreSQL (broker/direct.py: no execution context or result metadata
    built per run)."""
    return Statement(_project_and_role(Project.__table__.c.id))  # type: ignore[attr-defined]


def _project_and_role(what: Any) -> Any:
    """``what`` of the project named ``:code``, and ``:me``'s role in it (None: no member)."""
    projects, members, users = (t.__table__ for t in (Project, Membership, User))  # type: ignore[union-attr]
    return (sa.select(what, members.c.role).select_from(projects)
            .outerjoin(users, users.c.name == sa.bindparam("me"))
            .outerjoin(members, sa.and_(members.c.project_id == projects.c.id, members.c.user_id == users.c.id))
            .where(projects.c.code == sa.bindparam("code")))


def require_role(principal: Principal, role: str) -> None:
    if role not in principal.roles:
        raise Forbidden(f"This needs the {role} role.")
