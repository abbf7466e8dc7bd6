"""Dashboard sessions: who is logged in, CSRF tokens, the session secret.

The session lives in a signed cookie (Starlette's ``SessionMiddleware``, cookie
``aifa_dashboard_session``: HttpOnly, SameSite=Lax, Secure when the broker's public
URL is https). It holds the user's name and global roles, never a token. Every
state-changing form carries a CSRF token that must equal the one in the session.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import Request

from broker.auth import GLOBAL_ROLES, Principal
from broker.config import Settings

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


def log_in(request: Request, *, name: str, roles: frozenset[str], email: str | None, via: str) -> None:
    """Start a fresh session (no fixation: everything before is dropped, new CSRF token)."""
    request.session.clear()
    request.session.update({"user": name, "roles": sorted(roles & GLOBAL_ROLES), "email": email, "via": via,
                            "login_at": int(time.time()), "csrf": secrets.token_urlsafe(32)})


def log_out(request: Request) -> None:
    request.session.clear()


def current_principal(request: Request, settings: Settings) -> Principal | None:
    """The logged-in user, or None (no session, or older than ``dashboard_session_hours``)."""
    session: dict[str, Any] = request.session
    name, login_at = session.get("user"), session.get("login_at")
    if not isinstance(name, str) or not isinstance(login_at, int):
        return None
    if time.time() - login_at > settings.dashboard_session_hours * 3600:
        session.clear()
        return None
    roles = frozenset(r for r in session.get("roles", []) if r in GLOBAL_ROLES)
    email = session.get("email")
    return Principal(name, roles, email if isinstance(email, str) else None)


def safe_next(target: str | None) -> str:
    """A post-login destination inside the dashboard only (no open redirect)."""
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return "/dashboard"
