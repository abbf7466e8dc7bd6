"""The OpenAPI document states the contract's error answers too (**contract**).

Every ``/v1`` operation declares the problem answers it can give, each as
``application/problem+json`` with the ``Problem`` schema (RFC 9457 + a stable
``code``), and ``Retry-After`` where the client is told when to come back. The
declarations follow from what the route is: every caller is authenticated (401) and
may be refused (403) or throttled (429) and may meet an unavailable database or
cluster (503) and may name (in the path, the query or the body) something that does
not exist or is invisible (404); a change can conflict (409);
a body can be too large (413); any input can be invalid (422).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from broker.api.problems import PROBLEM

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details; `code` is stable and meant for programs.",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "code": {"type": "string", "pattern": "^[a-z0-9_]+$"},
        "detail": {"type": "string"},
        "errors": {"type": "array", "description": "422 validation_error: every problem of the request",
                   "items": {"type": "object", "required": ["field", "message"],
                             "properties": {"field": {"type": "string"}, "message": {"type": "string"},
                                            "type": {"type": "string"}}}},
        "denials": {"type": "array", "description": "403: every eligibility denial",
                    "items": {"type": "object", "properties": {"code": {"type": "string"},
                                                               "detail": {"type": "string"}}}},
        "candidates": {"type": "array", "description": "403 `no_eligible_cluster` (`cluster: auto`): every "
                       "candidate cluster with its denials, estimate and expected start",
                       "items": {"type": "object"}},
    },
    "additionalProperties": True,
}

_WHY = {
    401: "no or invalid bearer token (`unauthenticated`)",
    403: "the caller's role or the eligibility chain refuses (`forbidden`, `project_inactive`, …, "
         "`no_eligible_cluster`)",
    404: "no such object, or one the caller may not see (`not_found`)",
    409: "conflicts with the current state (`conflict`, `quota_exceeded`, `idempotency_in_progress`, …)",
    413: "the request body is larger than the broker accepts (`payload_too_large`)",
    422: "invalid input: every problem is listed in `errors` (`validation_error`, `request_too_large`, "
         "`unsupported_directive` naming the script line, `invalid_dependency`, …)",
    429: "too many requests; retry after `Retry-After` seconds (`rate_limited`)",
    503: "the database or the cluster cannot be reached now; retry after `Retry-After` seconds",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "integer", "minimum": 0}}}
_BODY_METHODS = {"post", "put", "patch"}


def problem_statuses(method: str, operation: dict[str, Any]) -> list[int]:
    """The problem answers one ``/v1`` operation can give (see the module doc)."""
    statuses = {401, 403, 404, 422, 429, 503}
    has_body = "requestBody" in operation
    if method != "get":
        statuses.add(409)
    if has_body or method in _BODY_METHODS:
        statuses.add(413)
    return sorted(statuses)


def _problem_response(status: int) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": _WHY[status],
                              "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    if status in (409, 429, 503):
        answer["headers"] = _RETRY_AFTER
    return answer


def build(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with every problem answer declared."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Problem"] = PROBLEM_SCHEMA
    for path, operations in doc.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if any(p.get("name") == "format" for p in operation.get("parameters", ())) and "200" in responses:
                # reports answer CSV with ?format=csv or Accept: text/csv
                responses["200"].setdefault("content", {})["text/csv"] = {"schema": {"type": "string"}}
            for status in problem_statuses(method, operation):
                responses[str(status)] = _problem_response(status)
    return doc


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) return :func:`build`'s document, once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
