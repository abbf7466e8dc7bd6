"""Dashboard sessions, server-side: the cookie carries only a random session id.

A session ends when it expires, when its user logs out (that session), and when the
user's roles change: a login with other global roles, or a change of the user's
project role, revokes every other open session of the user, so no browser keeps
acting with roles the user no longer has.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.db import session_scope
from broker.models import DashboardSession, utcnow

_TABLE: sa.Table = DashboardSession.__table__  # type: ignore[attr-defined]


def open_session(engine: Engine, *, user: str, roles: frozenset[str], hours: float) -> str:
    """Record a new session and return its id; the user's open sessions with other
    roles are revoked (a role change)."""
    sid = secrets.token_urlsafe(32)
    now = utcnow()
    with session_scope(engine) as session:
        roles_seen(session, user=user, roles=roles)
        session.add(DashboardSession(id=sid, user_name=user, roles=sorted(roles), created_at=now,
                                     expires_at=now + timedelta(hours=hours)))
    return sid


def roles_seen(session: Session, *, user: str, roles: frozenset[str]) -> int:
    """The user authenticated (API token) with these global roles: revoke their open
    dashboard sessions that were opened with other roles (a role change). A read, and
    a write only when there is something to revoke."""
    now = utcnow()
    stale = [row.id for row in session.execute(sa.select(_TABLE.c.id, _TABLE.c.roles).where(
        _TABLE.c.user_name == user, _TABLE.c.revoked_at.is_(None), _TABLE.c.expires_at > now)).all()
        if set(row.roles or []) != set(roles)]
    if stale:
        _revoke(session, stale, "role_change")
    return len(stale)


def active(engine: Engine, sid: str) -> DashboardSession | None:
    """The session if it exists, is not revoked and has not expired."""
    if not sid or len(sid) > 64:
        return None
    with session_scope(engine) as session:
        row = session.get(DashboardSession, sid)
        if row is None or row.revoked_at is not None or row.expires_at <= utcnow():
            return None
        session.expunge(row)
        return row


def revoke(engine: Engine, sid: str, reason: str = "logout") -> None:
    with session_scope(engine) as session:
        _revoke(session, [sid], reason)


def revoke_user(session: Session, user: str, reason: str) -> int:
    """Revoke every open session of ``user`` (in the caller's transaction)."""
    result = session.execute(sa.update(_TABLE).where(_TABLE.c.user_name == user, _TABLE.c.revoked_at.is_(None))
                             .values(revoked_at=utcnow(), revoked_reason=reason))
    return int(result.rowcount)  # type: ignore[attr-defined]


def _revoke(session: Session, ids: list[str], reason: str) -> None:
    session.execute(sa.update(_TABLE).where(_TABLE.c.id.in_(ids), _TABLE.c.revoked_at.is_(None))
                    .values(revoked_at=utcnow(), revoked_reason=reason))
