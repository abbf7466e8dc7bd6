"""RFC 9457 problem+json responses: the one place errors become HTTP."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from broker.db import DatabaseFault, classify
from broker.errors import BrokerError, Replayed

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
_HTTP_CODES = {401: "unauthenticated", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
               406: "not_acceptable", 413: "payload_too_large", 415: "unsupported_media_type",
               422: "validation_error", 429: "rate_limited"}
#: seconds a client should wait: the pool frees within a request's time; an outage
#: takes longer (and the client should not hammer a recovering database)
RETRY_AFTER_OVERLOADED = 2
RETRY_AFTER_DATABASE = 5


def problem(status: int, code: str, title: str, detail: str, *, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    headers = dict(headers or {})
    if "retry_after" in extra:
        headers["Retry-After"] = str(int(extra.pop("retry_after")))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = {"type": f"https://aifa-broker.eu/problems/{code}", "title": title, "status": status,
            "code": code, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _allowed(app: FastAPI, request: Request) -> str:
    """Every method some route takes at this path (Starlette names only the first route's)."""
    base = {k: request.scope[k] for k in ("type", "path", "root_path", "headers", "query_string")
            if k in request.scope}
    return ", ".join(m for m in _METHODS if any(
        route.matches({**base, "method": m})[0] == Match.FULL for route in app.router.routes))


def install(app: FastAPI) -> None:
    """Register the exception handlers."""

    @app.exception_handler(BrokerError)
    async def _broker(_: Request, exc: BrokerError) -> JSONResponse:
        headers = {"Idempotent-Replayed": "true"} if isinstance(exc, Replayed) else None
        return problem(exc.status, exc.code, exc.title, exc.detail, headers=headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _loc(e), "message": e.get("msg", "invalid"), "type": e.get("type", "")}
                  for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:10])
        return problem(422, "validation_error", "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError | UnicodeDecodeError | ValueError):
            # a body that is not JSON the broker can read (too deeply nested, not UTF-8)
            return problem(422, "validation_error", "Invalid request",
                           f"The request body is not readable JSON ({type(exc.__cause__).__name__}).")
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed(app, request)
        return problem(exc.status_code, code, code.replace("_", " ").capitalize(), str(exc.detail),
                       headers=headers)

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def _database(request: Request, exc: sa.exc.SQLAlchemyError) -> JSONResponse:
        fault = classify(exc)
        if fault is None or fault.kind == "other":
            return await _unexpected(request, exc)
        if fault.kind in {"unavailable", "serialization", "pool_exhausted"}:
            log.warning("%s %s: %s (%s)", request.method, request.url.path, fault.detail,
                        type(exc).__name__)
        return database_problem(fault)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal_error", "Internal error",
                       "The broker hit an unexpected error; it has been logged.")


def database_problem(fault: DatabaseFault) -> JSONResponse:
    """The answer for a classified database error (never a 500)."""
    if fault.kind in {"foreign_key", "unique", "integrity"}:
        return problem(409, "conflict", "Conflict", fault.detail)
    if fault.kind == "data":
        return problem(422, "validation_error", "Invalid request", fault.detail)
    if fault.kind == "pool_exhausted":
        return problem(503, "overloaded", "Overloaded", "The broker is busy; try again shortly.",
                       retry_after=RETRY_AFTER_OVERLOADED)
    if fault.kind == "serialization":
        return problem(503, "database_unavailable", "Database busy",
                       f"{fault.detail} The change was not made; try again.",
                       retry_after=RETRY_AFTER_OVERLOADED)
    return problem(503, "database_unavailable", "Database unavailable",
                   f"{fault.detail} Try again later.", retry_after=RETRY_AFTER_DATABASE)
