"""Dashboard pages (server-rendered Jinja2; every table works without JavaScript).

Who sees what: quota managers see every project; a PI sees a read-only view of
the projects where they are PI; anyone else gets 403. Pages are GET only; the
only forms that change state (login with a token, logout) carry a CSRF token.
"""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlmodel import Session, col, select

from broker.auth import Principal
from broker.config import Settings
from broker.dashboard import session as sess
from broker.dashboard.oidc import identity
from broker.db import session_scope
from broker.errors import BrokerError, Unauthenticated
from broker.models import Allocation, Cluster, Membership, Project, User
from broker.services import notifications as notes
from broker.services import usage as usage_svc

log = logging.getLogger(__name__)
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
#: the "Runs out" cell when there is no date (see broker.services.usage.forecast)
TEMPLATES.env.globals["forecast_words"] = {
    "not_before_end": "not before the end", "not_burning": "–", "beyond_horizon": "not within 10 years"}
router = APIRouter(prefix="/dashboard", include_in_schema=False)

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
SORT_LABELS = [("project", "Project"), ("cluster", "Cluster"), ("status", "Status"), ("used", "Used"),
               ("reserved", "Reserved"), ("remaining", "Remaining"), ("percent_used", "% used"),
               ("burn_rate_per_day", "Burn / day"), ("projected_exhaustion", "Runs out"),
               ("days_left", "Days left")]


class LoginRequired(Exception):
    """Raised by pages when no one is logged in: redirect to the login page."""


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page with the dashboard's security headers and the common context."""
    principal = sess.current_principal(request, _settings(request))
    ctx = {"user": principal, "csrf": sess.csrf_token(request) if principal else None, **context}
    response = TEMPLATES.TemplateResponse(request, template, ctx, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def _require(request: Request) -> Principal:
    principal = sess.current_principal(request, _settings(request))
    if principal is None:
        raise LoginRequired
    return principal


def _scope(session: Session, principal: Principal) -> list[int] | None:
    """Project ids the user may see: None = all (quota manager); PIs: their projects."""
    if principal.is_quota_manager:
        return None
    user = session.exec(select(User).where(User.name == principal.name)).first()
    if user is None:
        return []
    return list(session.exec(select(Membership.project_id).where(
        Membership.user_id == user.id, Membership.role == "pi")).all())


def _forbidden(request: Request) -> HTMLResponse:
    return render(request, "forbidden.html", status_code=403, title="Access refused")


def _engine(request: Request) -> Any:
    return request.app.state.engine


# --- portfolio ------------------------------------------------------------------------------

def _portfolio_rows(session: Session, ids: list[int] | None, f: dict[str, Any]) -> list[dict[str, Any]]:
    rows = usage_svc.allocation_summaries(session, project_ids=ids, window_days=f["window_days"])
    return usage_svc.filter_portfolio(
        rows, status=f["status"] or None, cluster=f["cluster"] or None, q=f["q"] or None,
        min_used=f["min_used"], max_used=f["max_used"], max_days_left=f["max_days_left"],
        underused=True if f["underused"] else None, sort=f["sort"], descending=f["order"] == "desc")


def _number(raw: str | None, kind: type[float] | type[int]) -> float | int | None:
    """A form field as a number; empty or malformed input means "no filter"."""
    try:
        return kind(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def portfolio_filters(request: Request) -> dict[str, Any]:
    """The portfolio's filter/sort query parameters, leniently parsed (an empty
    field of the HTML form is no filter, never an error)."""
    qp = request.query_params
    sort = qp.get("sort", "project")
    window = _number(qp.get("window_days"), int)
    return {"status": qp.get("status", "")[:16], "cluster": qp.get("cluster", "")[:64], "q": qp.get("q", "")[:100],
            "min_used": _number(qp.get("min_used"), float), "max_used": _number(qp.get("max_used"), float),
            "max_days_left": _number(qp.get("max_days_left"), int),
            "underused": qp.get("underused", "").lower() in ("1", "true", "on", "yes"),
            "sort": sort if sort in usage_svc.SORT_KEYS else "project",
            "order": "desc" if qp.get("order") == "desc" else "asc",
            "window_days": max(1, min(365, int(window or 14)))}


Filters = Annotated[dict[str, Any], Depends(portfolio_filters)]


def _query(f: dict[str, Any], **override: Any) -> str:
    merged = {**f, **override}
    return urlencode({k: ("1" if v is True else v) for k, v in merged.items() if v not in (None, "", False)})


@router.get("", response_class=HTMLResponse)
def portfolio(request: Request, f: Filters) -> Response:
    """The portfolio: every visible allocation, filterable and sortable."""
    principal = _require(request)
    with session_scope(_engine(request)) as session:
        ids = _scope(session, principal)
        if ids == []:
            return _forbidden(request)
        rows = _portfolio_rows(session, ids, f)
        clusters = sorted(session.exec(select(Cluster.name)).all())
    sort_links = [(key, label, _query(f, sort=key, order="desc" if f["sort"] == key and f["order"] == "asc"
                                      else "asc")) for key, label in SORT_LABELS]
    return render(request, "portfolio.html", title="Portfolio", rows=rows, f=f, clusters=clusters,
                  statuses=["pending", "active", "suspended", "closed"], sort_links=sort_links,
                  csv_query=_query(f), read_only=not principal.is_quota_manager)


@router.get("/portfolio.csv")
def portfolio_csv(request: Request, f: Filters) -> Response:
    """The portfolio as shown (same filters), as CSV."""
    principal = _require(request)
    with session_scope(_engine(request)) as session:
        ids = _scope(session, principal)
        if ids == []:
            return _forbidden(request)
        rows = _portfolio_rows(session, ids, f)
    return Response(usage_svc.portfolio_csv(rows), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="portfolio.csv"', **SECURITY_HEADERS})


# --- one project ------------------------------------------------------------------------------

def _visible(session: Session, principal: Principal, code: str) -> Project | None:
    project = session.exec(select(Project).where(Project.code == code)).first()
    if project is None:
        return None
    ids = _scope(session, principal)
    if ids is not None and project.id not in ids:
        return None
    return project


@router.get("/projects/{code}", response_class=HTMLResponse)
def project_page(request: Request, code: str, from_raw: Annotated[str, Query(alias="from", max_length=10)] = "",
                 to_raw: Annotated[str, Query(alias="to", max_length=10)] = "",
                 window_days: Annotated[int, Query(ge=1, le=365)] = 14) -> Response:
    """Burn-down per allocation, usage by user and cluster, recent jobs, ledger, notifications."""
    principal = _require(request)
    from_, to = _date(from_raw), _date(to_raw)
    with session_scope(_engine(request)) as session:
        if _scope(session, principal) == []:
            return _forbidden(request)
        project = _visible(session, principal, code)
        if project is None:
            return render(request, "not_found.html", status_code=404, title="Not found", code=code)
        pid = project.id or 0
        try:
            by_user = usage_svc.usage_rows(session, project_ids=[pid], group_by=["user"], start=from_, end=to)
            by_cluster = usage_svc.usage_rows(session, project_ids=[pid], group_by=["cluster", "partition"],
                                              start=from_, end=to)
            by_month = usage_svc.usage_rows(session, project_ids=[pid], group_by=["month"], start=from_, end=to)
        except BrokerError as exc:
            return render(request, "not_found.html", status_code=422, title="Invalid range", code=code,
                          detail=exc.detail)
        summaries = usage_svc.allocation_summaries(session, project_ids=[pid], window_days=window_days)
        allocs = session.exec(select(Allocation).where(Allocation.project_id == pid)
                              .order_by(col(Allocation.id))).all()
        charts = [usage_svc.burndown(session, a, window_days=window_days, project=project) for a in allocs]
        members = session.exec(select(User.name, Membership.role)
                               .join(Membership, col(Membership.user_id) == col(User.id))
                               .where(Membership.project_id == pid).order_by(col(User.name))).all()
        jobs = usage_svc.recent_jobs(session, pid)
        ledger = usage_svc.ledger_entries(session, pid)
        adjustments = usage_svc.ledger_entries(session, pid, kinds=("grant", "adjust"))
        notifications = notes.notifications_for(session, project_ids=[pid], limit=50)
    range_query = urlencode({k: v for k, v in (("from", from_), ("to", to)) if v})
    return render(request, "project.html", title=f"Project {code}", project=project, summaries=summaries,
                  charts=[_chart_view(c) for c in charts], by_user=by_user, by_cluster=by_cluster,
                  by_month=by_month, members=members, jobs=jobs, ledger=ledger, adjustments=adjustments,
                  notifications=notifications, from_=from_, to=to, window_days=window_days,
                  range_query=range_query, read_only=not principal.is_quota_manager,
                  totals=usage_svc.totals_by_unit(by_user))


def _date(raw: str) -> date | None:
    """A date field of a form; empty or malformed means "open-ended"."""
    try:
        return date.fromisoformat(raw) if raw else None
    except ValueError:
        return None


def _chart_view(chart: dict[str, Any]) -> dict[str, Any]:
    """The chart data plus a short text table (month ends and today) for non-visual readers."""
    labels: list[str] = chart["labels"]
    keep = {i for i, d in enumerate(labels) if i + 1 == len(labels) or labels[i + 1][:7] != d[:7]}
    keep |= {i for i, d in enumerate(labels) if d == chart["today"]}
    points = [{"date": labels[i], "granted": chart["granted"][i], "used": chart["used"][i],
               "projected": chart["projected"][i]} for i in sorted(keep)]
    return {**chart, "points": points}


@router.get("/projects/{code}/usage.csv")
def project_usage_csv(request: Request, code: str,
                      group_by: Annotated[str, Query(max_length=100)] = "user",
                      from_raw: Annotated[str, Query(alias="from", max_length=10)] = "",
                      to_raw: Annotated[str, Query(alias="to", max_length=10)] = "") -> Response:
    """A project's usage as CSV, grouped as asked."""
    principal = _require(request)
    from_, to = _date(from_raw), _date(to_raw)
    with session_scope(_engine(request)) as session:
        if _scope(session, principal) == []:
            return _forbidden(request)
        project = _visible(session, principal, code)
        if project is None:
            return render(request, "not_found.html", status_code=404, title="Not found", code=code)
        try:
            keys = usage_svc.parse_group_by(group_by)
            rows = usage_svc.usage_rows(session, project_ids=[project.id or 0], group_by=keys, start=from_, end=to)
        except BrokerError as exc:
            return Response(exc.detail, status_code=422, media_type="text/plain")
    return Response(usage_svc.rows_to_csv(rows, keys), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{code}-usage.csv"', **SECURITY_HEADERS})


@router.get("/notifications", response_class=HTMLResponse)
def notifications_page(request: Request) -> Response:
    """Threshold crossings and expiry warnings with their webhook delivery status."""
    principal = _require(request)
    with session_scope(_engine(request)) as session:
        ids = _scope(session, principal)
        if ids == []:
            return _forbidden(request)
        rows = notes.notifications_for(session, project_ids=ids, limit=500)
    return render(request, "notifications.html", title="Notifications", rows=rows)


# --- login / logout ------------------------------------------------------------------------------

@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: Annotated[str, Query(max_length=500)] = "/dashboard") -> Response:
    """Sign-in page: the OpenID provider's button, or (without one) a token form."""
    settings = _settings(request)
    return render(request, "login.html", title="Sign in", next=sess.safe_next(next),
                  oidc=settings.dashboard_oidc is not None, login_csrf=sess.csrf_token(request))


@router.post("/login", response_class=HTMLResponse)
def login_with_token(request: Request, token: Annotated[str, Form(max_length=16384)],
                     csrf: Annotated[str, Form(max_length=200)] = "",
                     next: Annotated[str, Form(max_length=500)] = "/dashboard") -> Response:
    """Embedded mode (no OpenID provider configured): sign in with a broker token."""
    settings = _settings(request)
    if settings.dashboard_oidc is not None:
        return render(request, "login.html", status_code=404, title="Sign in", next="/dashboard", oidc=True,
                      login_csrf=sess.csrf_token(request))
    if not sess.csrf_ok(request, csrf):
        return render(request, "login.html", status_code=403, title="Sign in", next=sess.safe_next(next),
                      oidc=False, login_csrf=sess.csrf_token(request),
                      error="The form expired. Please try again.")
    try:
        principal = request.app.state.authenticator.authenticate(token.strip())
    except Unauthenticated:
        return render(request, "login.html", status_code=401, title="Sign in", next=sess.safe_next(next),
                      oidc=False, login_csrf=sess.csrf_token(request), error="That token is not valid.")
    sess.log_in(request, name=principal.name, roles=principal.roles, email=principal.email, via="token")
    return RedirectResponse(sess.safe_next(next), status_code=303)


@router.get("/login/oidc")
async def login_oidc(request: Request, next: Annotated[str, Query(max_length=500)] = "/dashboard") -> Response:
    """Start the authorization-code + PKCE flow at the OpenID provider."""
    client = request.app.state.dashboard_oidc_client
    if client is None:
        return RedirectResponse("/dashboard/login", status_code=303)
    request.session["next"] = sess.safe_next(next)
    settings = _settings(request)
    redirect_uri = (settings.public_url.rstrip("/") + "/dashboard/auth/callback") if settings.public_url \
        else str(request.url_for("dashboard_callback"))
    return await client.authorize_redirect(request, redirect_uri)  # type: ignore[no-any-return]


@router.get("/auth/callback", name="dashboard_callback")
async def callback(request: Request) -> Response:
    """The provider sends the browser back here with the code; authlib checks state + PKCE."""
    client = request.app.state.dashboard_oidc_client
    settings = _settings(request)
    if client is None or settings.dashboard_oidc is None:
        return RedirectResponse("/dashboard/login", status_code=303)
    try:
        name, roles, email = await identity(client, request, settings.dashboard_oidc)
    except Exception as exc:  # any failure of the flow: show it, never a stack trace
        log.warning("dashboard login failed: %s", type(exc).__name__)
        return render(request, "login.html", status_code=400, title="Sign in", next="/dashboard", oidc=True,
                      login_csrf=sess.csrf_token(request), error="Sign-in failed. Please try again.")
    target = sess.safe_next(request.session.get("next"))
    sess.log_in(request, name=name, roles=roles, email=email, via="oidc")
    return RedirectResponse(target, status_code=303)


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    """End the session (CSRF-protected form)."""
    if not sess.csrf_ok(request, csrf):
        return Response("CSRF check failed", status_code=403, media_type="text/plain")
    sess.log_out(request)
    return RedirectResponse("/dashboard/login", status_code=303)
