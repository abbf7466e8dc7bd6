"""/v1/jobs: submit, estimate, list, get, cancel; an array job's tasks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse, Response

from broker.api.deps import PrincipalDep, RegistryDep, SessionDep
from broker.api.responses import json_data
from broker.api.unit_of_work import UnitOfWorkRoute
from broker.schemas import EstimateOut, JobOut, JobPage, JobRequest, JobTaskOut, JobTaskPage
from broker.services import idempotency
from broker.services import jobs as job_service

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=UnitOfWorkRoute)


@router.post("", status_code=201, response_model=JobOut,
             responses={202: {"model": JobOut, "description": "accepted; the cluster outcome is being reconciled"}})
def submit_job(
    request: Request, body: JobRequest, principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    """Submit a job. Honors ``Idempotency-Key`` (per user): a retry gets the first answer."""
    # the app's engine, settings and registry read here, not as dependencies: FastAPI
    # solves each dependency per request (~10 µs of CPU each)
    state = request.app.state
    state.rate_limiter.check(principal.name)
    answer = idempotency.submit_once(engine=state.engine, settings=state.settings, registry=state.registry,
                                     principal=principal, body=body, key=idempotency_key)
    response = json_data(answer.body)  # plain data (JobOut's fields): written by pydantic-core in one pass
    response.status_code = answer.status
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@router.post("/estimate", response_model=EstimateOut)
def estimate_job(request: Request, body: JobRequest, principal: PrincipalDep, session: SessionDep,
                 registry: RegistryDep) -> Response:
    """Dry run: eligibility verdict, cost and remaining budget; submits nothing.
    With ``cluster: auto``: the placement (every candidate, its start and denials)."""
    # (``registry`` stays a dependency: it marks the route as reaching outside its
    # transaction, so a serialization failure does not rerun its placement probes)
    out = job_service.estimate(session, settings=request.app.state.settings, principal=principal, body=body,
                               registry=registry)
    return json_data(out)  # the model's own JSON: not validated again and dumped by FastAPI


@router.get("", response_model=JobPage)
def list_jobs(
    principal: PrincipalDep, session: SessionDep,
    project: Annotated[str | None, Query(max_length=64)] = None,
    state: Annotated[str | None, Query(max_length=16, pattern=r"^[A-Za-z_]+$")] = None,
    cluster: Annotated[str | None, Query(max_length=64)] = None,
    user: Annotated[str | None, Query(max_length=255)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """Jobs visible to the caller, newest first; follow ``next_cursor`` for more."""
    return json_data(job_service.list_jobs(session, principal=principal, project=project, state=state,
                                            cluster=cluster, user=user, limit=limit, cursor=cursor))


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> Response:
    return json_data(job_service.get_job_answer(session, principal=principal, job_id=job_id))


@router.get("/{job_id}/output", response_class=PlainTextResponse)
def job_output(
    job_id: str, principal: PrincipalDep, session: SessionDep, registry: RegistryDep,
    stream: Annotated[str, Query(pattern="^(stdout|stderr)$")] = "stdout",
    tail: Annotated[int, Query(ge=1, le=1_048_576)] = 65_536,
    task: Annotated[int | None, Query(ge=0, le=4_000_000)] = None,
) -> PlainTextResponse:
    """The last ``tail`` bytes of the job's stdout or stderr (owner, project PI).
    An array job: one task's output (``task``; default its first task)."""
    text = job_service.read_output(session, principal=principal, registry=registry, job_id=job_id,
                                   stream=stream, tail=tail, task=task)
    where = job_service.output_location(session, registry=registry, job_id=job_id, stream=stream, task=task)
    # where the file itself is (e.g. a `local` job's file on the broker's machine)
    return PlainTextResponse(text, headers={"X-Output-Location": where} if where else None)


@router.delete("/{job_id}", response_model=JobOut, status_code=202)
def cancel_job(job_id: str, principal: PrincipalDep, session: SessionDep, registry: RegistryDep) -> JobOut:
    """Cancel; the job becomes CANCELLED when the scheduler confirms."""
    return job_service.cancel_job(session, principal=principal, registry=registry, job_id=job_id)


@router.get("/{job_id}/tasks", response_model=JobTaskPage)
def list_tasks(job_id: str, principal: PrincipalDep, session: SessionDep) -> JobTaskPage:
    """An array job's tasks (``--array``), in task order: state, exit code, charge.
    404 ``task_not_found`` for a job that is not an array."""
    return job_service.list_tasks(session, principal=principal, job_id=job_id)


@router.delete("/{job_id}/tasks/{task}", response_model=JobTaskOut, status_code=202)
def cancel_task(
    job_id: str, task: Annotated[int, PathParam(ge=0, le=4_000_000)], principal: PrincipalDep,
    session: SessionDep, registry: RegistryDep,
) -> JobTaskOut:
    """Cancel one task of an array job (the others go on); it becomes CANCELLED,
    and its share of the reservation is released, when the scheduler confirms.
    ``DELETE /v1/jobs/{id}`` cancels the whole array."""
    return job_service.cancel_task(session, principal=principal, registry=registry, job_id=job_id, task=task)
