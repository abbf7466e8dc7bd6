"""Waiting on the server: the long poll ``GET /v1/jobs/{id}?wait_for=...`` and the
Server-Sent Events streams ``GET /v1/jobs/{id}/events`` and
``GET /v1/projects/{code}/events`` (see broker/api/streams.py and docs/jobs.md).

Every endpoint here is ``async`` and reads the database only briefly, in a worker
thread; while it waits it holds neither a thread nor a connection, and it leaves
the admission count (a held request is not load).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from broker import job_webhooks
from broker.api.deps import EngineDep, PrincipalDep
from broker.api.streams import EventHub, StreamSlots, event_stream, last_event_id, parse_target, reached, wait_until
from broker.auth import Principal
from broker.db import session_scope
from broker.errors import InvalidRequest
from broker.schemas import JobOut
from broker.services import jobs as job_service
from broker.services.common import find_user, visible_project

router = APIRouter(tags=["events"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class WaitForRoute(APIRoute):
    """``GET /v1/jobs/{id}`` **with** ``wait_for`` is answered here (async); without
    it the route does not match and the plain read of routers/jobs.py answers."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            if "wait_for" not in query:
                return Match.NONE, {}
        return match, child


def hub_of(request: Request) -> EventHub:
    """The process's event hub (made on first use; closed with the app)."""
    state = request.app.state
    hub: EventHub | None = getattr(state, "event_hub", None)
    if hub is None:
        hub = state.event_hub = EventHub(state.engine, poll_seconds=state.settings.event_poll_seconds)
    return hub


def slots_of(request: Request) -> StreamSlots:
    state = request.app.state
    slots: StreamSlots | None = getattr(state, "stream_slots", None)
    if slots is None:
        slots = state.stream_slots = StreamSlots(state.settings.max_streams_per_user)
    return slots


def _leave_admission(request: Request) -> None:
    """A held request stops counting as in-flight load (admission control, if any)."""
    leave = request.scope.get("state", {}).get("leave_admission")
    if callable(leave):
        leave()


def _read_job(engine: Any, principal: Principal, job_id: str) -> JobOut:
    with session_scope(engine) as session:
        return job_service.get_job(session, principal=principal, job_id=job_id)


async def wait_for_job(
    request: Request, job_id: str, principal: PrincipalDep, engine: EngineDep,
    wait_for: Annotated[str, Query(max_length=16)],
    timeout: Annotated[float, Query(ge=0, le=3600, allow_inf_nan=False)] = 30.0,
) -> JSONResponse:
    """Long poll: the job once it is at or past ``wait_for`` (a state, any case, or
    ``terminal``), or as it is after ``timeout`` seconds (at most
    ``long_poll_max_seconds``). ``X-Wait-Satisfied`` says which."""
    target = parse_target(wait_for)
    timeout = min(timeout, request.app.state.settings.long_poll_max_seconds)
    job = await asyncio.to_thread(_read_job, engine, principal, job_id)
    if not reached(job.state, target) and timeout > 0:
        slots = slots_of(request)
        slots.acquire(principal.name)
        try:
            _leave_admission(request)
            job = await _wait(request, engine, principal, job, target, timeout)
        finally:
            slots.release(principal.name)
    done = reached(job.state, target)
    return JSONResponse(job.model_dump(mode="json"), headers={"X-Wait-Satisfied": "true" if done else "false"})


router.add_api_route("/v1/jobs/{job_id}", wait_for_job, methods=["GET"], response_model=JobOut,
                     include_in_schema=False, route_class_override=WaitForRoute)


async def _wait(request: Request, engine: Any, principal: Principal, job: JobOut, target: str,
                timeout: float) -> JobOut:
    hub = hub_of(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sub = await hub.subscribe(job_id=job.id)
    try:
        job = await asyncio.to_thread(_read_job, engine, principal, job.id)  # nothing slips in between
        while not reached(job.state, target):
            left = deadline - loop.time()
            if left <= 0 or not await wait_until(sub, target, left):
                break
            job = await asyncio.to_thread(_read_job, engine, principal, job.id)
    finally:
        hub.unsubscribe(sub)
    if not reached(job.state, target):
        job = await asyncio.to_thread(_read_job, engine, principal, job.id)
    return job


def _resume_from(header: str | None, query: int | None) -> int | None:
    raw = header if header is not None else (None if query is None else str(query))
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError as exc:
        raise InvalidRequest("Last-Event-ID must be an event id (a non-negative integer).") from exc
    if value < 0:
        raise InvalidRequest("Last-Event-ID must be an event id (a non-negative integer).")
    return value


LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)]
ResumeQuery = Annotated[int | None, Query(ge=0, description="the same as the Last-Event-ID header")]


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(
    request: Request, job_id: str, principal: PrincipalDep, engine: EngineDep,
    last_event_id: LastEventId = None, after: ResumeQuery = None,
) -> StreamingResponse:
    """Server-Sent Events: every transition of the job (``event: job``, ``id`` = the
    event id), from its first unless resumed with ``Last-Event-ID``; the stream ends
    after the job's terminal event."""
    resume = _resume_from(last_event_id, after)
    job = await asyncio.to_thread(_read_job, engine, principal, job_id)
    return await _open_stream(request, principal, project=job.project, resume=resume or 0,
                              until_terminal=True, job_id=job.id)


def _project_scope(engine: Any, principal: Principal, code: str) -> tuple[int, int | None]:
    """The project's id, and the user whose jobs alone the caller may follow (members:
    themselves; PIs and quota managers: everyone)."""
    with session_scope(engine) as session:
        project, role = visible_project(session, principal, code)
        if role == "pi" or principal.is_quota_manager:
            return project.id or 0, None
        me = find_user(session, principal.name)
        return project.id or 0, (me.id if me else -1)


@router.get("/v1/projects/{code}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def project_events(
    request: Request, code: str, principal: PrincipalDep, engine: EngineDep,
    last_event_id: LastEventId = None, after: ResumeQuery = None,
) -> StreamingResponse:
    """Server-Sent Events: transitions of the project's jobs (members: their own jobs;
    PIs and quota managers: all), from now on, or after ``Last-Event-ID``."""
    resume = _resume_from(last_event_id, after)
    project_id, user_id = await asyncio.to_thread(_project_scope, engine, principal, code)
    return await _open_stream(request, principal, project=code, resume=resume, until_terminal=False,
                              project_id=project_id, user_id=user_id)


async def _open_stream(request: Request, principal: Principal, *, project: str, resume: int | None,
                       until_terminal: bool, **filters: Any) -> StreamingResponse:
    slots, hub = slots_of(request), hub_of(request)
    slots.acquire(principal.name)
    sub = None
    try:
        _leave_admission(request)
        sub = await hub.subscribe(**filters)
        if resume is None:  # from now on: everything after the newest event at subscription
            resume = await asyncio.to_thread(last_event_id, hub.engine)
    except BaseException:
        if sub is not None:
            hub.unsubscribe(sub)
        slots.release(principal.name)
        raise
    body = event_stream(hub, sub, project=project, after=resume,
                        keepalive=request.app.state.settings.event_keepalive_seconds,
                        until_terminal=until_terminal, on_close=lambda: slots.release(principal.name))
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


def _notifications(engine: Any, principal: Principal, job_id: str) -> dict[str, Any]:
    with session_scope(engine) as session:
        job = job_service.get_job(session, principal=principal, job_id=job_id)
        return {"job_id": job.id, "notify": job_webhooks.status_of(session, job.id)}


@router.get("/v1/jobs/{job_id}/notifications", tags=["jobs"])
def job_notifications(job_id: str, principal: PrincipalDep, engine: EngineDep) -> dict[str, Any]:
    """The job's own webhook (``notify`` at submission; never its secret) and the
    delivery status of every announced transition."""
    return _notifications(engine, principal, job_id)
