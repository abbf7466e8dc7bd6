"""/v1/jobs: submit, estimate, list, get, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from broker.api.deps import EngineDep, PrincipalDep, RegistryDep, SessionDep, SettingsDep
from broker.db import session_scope
from broker.errors import BrokerError
from broker.schemas import EstimateOut, JobOut, JobPage, JobRequest
from broker.services import idempotency
from broker.services import jobs as job_service
from broker.services.common import get_or_create_user

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobOut,
             responses={202: {"model": JobOut, "description": "accepted; the cluster outcome is being reconciled"}})
def submit_job(
    request: Request, body: JobRequest, principal: PrincipalDep, engine: EngineDep, settings: SettingsDep,
    registry: RegistryDep, idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Submit a job. Honors ``Idempotency-Key`` (per user)."""
    request.app.state.rate_limiter.check(principal.name)
    if idempotency_key is None:
        result = job_service.submit(engine=engine, settings=settings, registry=registry,
                                    principal=principal, body=body)
        return JSONResponse(result.job.model_dump(mode="json"), status_code=result.status)
    idempotency.validate_key(idempotency_key)
    with session_scope(engine) as session:
        user_id = get_or_create_user(session, principal.name).id or 0
    digest = idempotency.request_hash(body.model_dump(mode="json"))
    replay = idempotency.begin(engine, user_id=user_id, key=idempotency_key, digest=digest,
                               ttl_hours=settings.idempotency_ttl_hours)
    if replay is not None:
        return JSONResponse(replay.body, status_code=replay.status, headers={"Idempotent-Replayed": "true"})
    try:
        result = job_service.submit(engine=engine, settings=settings, registry=registry,
                                    principal=principal, body=body)
    except BrokerError as exc:
        if exc.status >= 500:
            idempotency.abandon(engine, user_id=user_id, key=idempotency_key)
        else:
            body_out: dict[str, Any] = {"type": f"https://aifa-broker.eu/problems/{exc.code}",
                                        "title": exc.title, "status": exc.status, "code": exc.code,
                                        "detail": exc.detail, **exc.extra}
            idempotency.finish(engine, user_id=user_id, key=idempotency_key, status=exc.status,
                               body=body_out)
        raise
    except Exception:
        idempotency.abandon(engine, user_id=user_id, key=idempotency_key)
        raise
    payload = result.job.model_dump(mode="json")
    idempotency.finish(engine, user_id=user_id, key=idempotency_key, status=result.status, body=payload)
    return JSONResponse(payload, status_code=result.status)


@router.post("/estimate", response_model=EstimateOut)
def estimate_job(body: JobRequest, principal: PrincipalDep, session: SessionDep,
                 settings: SettingsDep) -> EstimateOut:
    """Dry run: eligibility verdict, cost and remaining budget; submits nothing."""
    return job_service.estimate(session, settings=settings, principal=principal, body=body)


@router.get("", response_model=JobPage)
def list_jobs(
    principal: PrincipalDep, session: SessionDep,
    project: Annotated[str | None, Query(max_length=64)] = None,
    state: Annotated[str | None, Query(max_length=16, pattern=r"^[A-Za-z_]+$")] = None,
    cluster: Annotated[str | None, Query(max_length=64)] = None,
    user: Annotated[str | None, Query(max_length=255)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobPage:
    """Jobs visible to the caller, newest first; follow ``next_cursor`` for more."""
    return job_service.list_jobs(session, principal=principal, project=project, state=state,
                                 cluster=cluster, user=user, limit=limit, cursor=cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> JobOut:
    return job_service.get_job(session, principal=principal, job_id=job_id)


@router.get("/{job_id}/output", response_class=PlainTextResponse)
def job_output(
    job_id: str, principal: PrincipalDep, session: SessionDep, registry: RegistryDep,
    stream: Annotated[str, Query(pattern="^(stdout|stderr)$")] = "stdout",
    tail: Annotated[int, Query(ge=1, le=1_048_576)] = 65_536,
) -> PlainTextResponse:
    """The last ``tail`` bytes of the job's stdout or stderr (owner, project PI)."""
    text = job_service.read_output(session, principal=principal, registry=registry, job_id=job_id,
                                   stream=stream, tail=tail)
    return PlainTextResponse(text)


@router.delete("/{job_id}", response_model=JobOut, status_code=202)
def cancel_job(job_id: str, principal: PrincipalDep, session: SessionDep, registry: RegistryDep) -> JobOut:
    """Cancel; the job becomes CANCELLED when the scheduler confirms."""
    return job_service.cancel_job(session, principal=principal, registry=registry, job_id=job_id)
