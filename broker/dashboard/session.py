"""Dashboard sessions: who is logged in, CSRF tokens, the session secret.

The session lives server-side (:mod:`broker.services.sessions`: user, global roles,
expiry, revocation); the signed cookie (Starlette's ``SessionMiddleware``, cookie
``aifa_dashboard_session``: HttpOnly, SameSite=Lax, Secure when the broker's public
URL is https, which production requires) names it by a random id and holds the CSRF
token, never a bearer token. Logout revokes the session on the server, so a copied
cookie is dead too; a role change revokes the user's other sessions. Every
state-changing form carries a CSRF token that must equal the one in the session.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy.engine import Engine

from broker.auth import GLOBAL_ROLES, Principal
from broker.config import Settings
from broker.services import sessions

COOKIE_NAME = "aifa_dashboard_session"


def session_secret(settings: Settings) -> str:
    """The configured ``session_secret``, else one created once in the data directory (0600)."""
    if settings.session_secret:
        return settings.session_secret
    path: Path = settings.data_dir / "dashboard_session_secret"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)  # refuses to overwrite one made concurrently
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def https_only(settings: Settings) -> bool:
    """Secure cookies when the broker is reached over https."""
    return bool(settings.public_url and settings.public_url.startswith("https://"))


def csrf_token(request: Request) -> str:
    """The session's CSRF token (created on first use)."""
    session: dict[str, Any] = request.session
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_ok(request: Request, submitted: str | None) -> bool:
    """True when the form's token matches the session's (constant-time)."""
    expected = request.session.get("csrf")
    return isinstance(expected, str) and isinstance(submitted, str) and hmac.compare_digest(expected, submitted)


def _engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def log_in(request: Request, *, name: str, roles: frozenset[str], email: str | None, via: str) -> None:
    """Start a fresh session (no fixation: everything before is dropped, new id, new CSRF token)."""
    previous = request.session.get("sid")
    if isinstance(previous, str):
        sessions.revoke(_engine(request), previous, "relogin")
    request.session.clear()
    settings: Settings = request.app.state.settings
    sid = sessions.open_session(_engine(request), user=name, roles=roles & GLOBAL_ROLES,
                                hours=settings.dashboard_session_hours)
    request.session.update({"sid": sid, "email": email, "via": via, "csrf": secrets.token_urlsafe(32)})
    request.state._state.pop("dashboard_principal", None)


def log_out(request: Request) -> None:
    """End the session on the server (the cookie, even a copy of it, is dead) and in the browser."""
    sid = request.session.get("sid")
    if isinstance(sid, str):
        sessions.revoke(_engine(request), sid, "logout")
    request.session.clear()
    request.state._state.pop("dashboard_principal", None)


def current_principal(request: Request, settings: Settings) -> Principal | None:
    """The logged-in user, or None (no session, or one revoked or past ``dashboard_session_hours``).

    Looked up once per request (a page renders inside its own database transaction,
    which on SQLite must not wait for a second one)."""
    if "dashboard_principal" in request.state._state:
        return request.state._state["dashboard_principal"]  # type: ignore[no-any-return]
    principal = _lookup(request)
    request.state._state["dashboard_principal"] = principal
    return principal


def _lookup(request: Request) -> Principal | None:
    session: dict[str, Any] = request.session
    sid = session.get("sid")
    row = sessions.active(_engine(request), sid) if isinstance(sid, str) else None
    if row is None:
        if sid is not None:
            session.clear()
        return None
    roles = frozenset(r for r in row.roles or [] if r in GLOBAL_ROLES)
    email = session.get("email")
    return Principal(row.user_name, roles, email if isinstance(email, str) else None)


def safe_next(target: str | None) -> str:
    """A post-login destination inside the dashboard only (no open redirect)."""
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return "/dashboard"
