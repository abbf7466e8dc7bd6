"""The quota managers' web dashboard at ``/dashboard`` (Jinja2 pages, OIDC login).

:func:`install` wires it into the FastAPI app: the session middleware (cookie
``aifa_dashboard_session``), the static assets (``static/``, with the charting
library copied into ``static/vendor/`` by ``make web``), the OpenID client when
``Settings.dashboard_oidc`` is set, and the pages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.config import Settings
from broker.dashboard import session as sess
from broker.dashboard.routes import LoginRequired, router

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/dashboard"


class DashboardSessions:
    """Starlette's ``SessionMiddleware`` for the dashboard's paths only: its cookie is
    scoped to ``/dashboard``, so an API request (a bearer token, no cookie) has no
    session to read, and skipping the middleware saves it the cookie parsing and a
    wrapper around every message it sends."""

    def __init__(self, app: ASGIApp, /, **session_options: Any) -> None:
        self.app = app
        self.sessions = SessionMiddleware(app, **session_options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if path == PREFIX or path.startswith(PREFIX + "/"):
            await self.sessions(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def install(app: FastAPI, settings: Settings) -> None:
    """Add the dashboard (pages, static files, session middleware, OIDC client) to ``app``."""
    app.state.dashboard_oidc_client = None
    if settings.dashboard_oidc is not None:
        from broker.dashboard.oidc import make_client

        app.state.dashboard_oidc_client = make_client(settings.dashboard_oidc)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    app.include_router(router)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/dashboard/login?next={quote(sess.safe_next(target), safe='')}",
                                status_code=303)

    app.add_middleware(DashboardSessions, secret_key=sess.session_secret(settings),
                       session_cookie=sess.COOKIE_NAME, max_age=int(settings.dashboard_session_hours * 3600),
                       same_site="lax", https_only=sess.https_only(settings), path=PREFIX)
