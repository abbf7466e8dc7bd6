"""The submission path and the job lifecycle (see DESIGN.md, "The submission path").

submit: eligibility → estimate → reserve + job row ``ACCEPTED`` (committed: the
write-ahead intent) → adapter.submit (outside any transaction) → record the
scheduler id (``PENDING``). If the broker dies in between, the tracker's
reconciler finds the job by its tag; nothing is ever submitted twice.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pydantic_core
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker import events, job_webhooks
from broker.adapter import (
    AdapterError,
    ClusterUnreachable,
    JobSpec,
    JobStatus,
    SchedulerJobRef,
    SubmitOutcomeUnknown,
)
from broker.auth import Principal
from broker.config import Settings
from broker.cost import MAX_MICRO
from broker.db import autocommit_connection, autocommit_session, insert_values, session_scope
from broker.direct import Statement
from broker.directives import EffectiveRequest
from broker.errors import (
    BrokerError,
    ClusterUnavailable,
    Conflict,
    EligibilityDenied,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
)
from broker.metrics import DENIALS, SUBMISSIONS, SUBMIT_ERRORS
from broker.models import Cluster, Job, JobTask, Membership, Project, User, UTCDateTime, utcnow
from broker.policy import Denial
from broker.registry import AdapterRegistry
from broker.schemas import DenialOut, EstimateOut, JobOut, JobRequest, JobTaskOut, JobTaskPage, Money
from broker.services import arrays, ledger, placement, single_statement
from broker.services.admission_rows import AllocationRow, ClusterRow, UserRow
from broker.services.clusters import adapter_for, breaker_retry_after, trip_breaker
from broker.services.common import find_user, get_or_create_user, to_units, visible_project
from broker.services.eligibility import Prepared, prepare, subject_for
from broker.services.settlement import settle
from broker.states import TERMINAL_STATES, JobState

log = logging.getLogger(__name__)


class AmbiguousJobId(Conflict):
    """A job id prefix matches more than one of the caller's jobs."""

    code, title = "ambiguous_job_id", "Ambiguous job id"


def parse_state(text: str) -> str:
    """A job state filter, case-insensitive (``running`` = ``RUNNING``); 422 for a
    word that is no state, naming the valid ones."""
    word = text.strip().upper()
    if word not in {s.value for s in JobState}:
        raise InvalidRequest(f"Unknown job state {text!r}; use one of: "
                             + ", ".join(s.value for s in JobState) + " (any case).")
    return word


class SubmitFailed(BrokerError):
    """The cluster refused the job (permanent); the job is kept as SUBMIT_FAILED."""

    status, code, title = 422, "submit_rejected", "The cluster refused the job"


def job_out(job: Job | SimpleNamespace | sa.Row[Any], *, project: str, cluster: str, user: str) -> JobOut:
    return JobOut(
        id=job.id, project=project, cluster=cluster, user=user, name=job.name,
        partition=job.partition, state=job.state, raw_state=job.raw_state,
        scheduler_job_id=job.scheduler_job_id,
        estimated_cost=Money(unit=job.unit, amount=to_units(job.estimated) or 0.0),
        reserved=Money(unit=job.unit, amount=to_units(job.reserved) or 0.0),
        charged=None if job.charged is None else Money(unit=job.unit, amount=to_units(job.charged) or 0.0),
        elapsed_seconds=job.elapsed_seconds, submitted_at=job.submitted_at, created_at=job.created_at,
        started_at=job.started_at, ended_at=job.ended_at, unknown_since=job.unknown_since,
        exit_code=job.exit_code, reason=job.reason, request=job.request,
        pending_reason=job.pending_reason, expected_start=job.expected_start_at, placement=job.placement,
        array=arrays.array_out(job),
    )


def job_out_loaded(session: Session, job: Job) -> JobOut:
    project = session.get(Project, job.project_id)
    cluster = session.get(Cluster, job.cluster_id)
    user = session.get(User, job.user_id)
    assert project and cluster and user
    return job_out(job, project=project.code, cluster=cluster.name, user=user.name)


# --- estimate and submit ---------------------------------------------------------------

def _prepare_for(session: Session, settings: Settings, principal: Principal,
                 body: JobRequest) -> tuple[UserRow, Prepared]:
    subject = subject_for(session, principal, body)
    user = subject.user
    prep = prepare(session, settings=settings, subject=subject, body=body,
                   is_quota_manager=principal.is_quota_manager)
    if prep.estimate >= MAX_MICRO:
        raise InvalidRequest("This job's estimate is larger than the broker can account for; ask for fewer "
                             "resources or less time.", code="request_too_large")
    return user, prep


def estimate(
    session: Session, *, settings: Settings, principal: Principal, body: JobRequest,
    registry: AdapterRegistry | None = None,
) -> EstimateOut:
    """Dry run: every denial, the cost and the remaining budget; submits nothing.

    ``cluster: auto`` (needs ``registry``): the placement — every candidate with its
    estimate, expected start and denials, and the cluster that would be chosen."""
    if body.cluster == placement.AUTO and registry is not None:
        placed = _place(session, settings, registry, principal, body)
        chosen = placed.chosen
        if chosen is None:
            denials = [DenialOut(code=d.code, detail=f"{c.cluster}: {d.detail}")
                       for c in placed.candidates for d in c.denials]
            return EstimateOut(allowed=False, denials=denials, estimated_cost=None, remaining=None,
                               placement=placed.out())
        out = chosen.out()
        return EstimateOut(allowed=True, denials=[], estimated_cost=out.estimated_cost, remaining=out.remaining,
                           cluster=chosen.cluster, placement=placed.out())
    _, prep = _prepare_for(session, settings, principal, body)
    denials = [DenialOut(code=d.code, detail=d.detail) for d in prep.denials]
    alloc = prep.allocation
    if alloc is not None:
        remaining = alloc.granted - alloc.charged - alloc.reserved
        if prep.estimate > remaining:
            denials.append(DenialOut(code="quota_exceeded",
                                     detail="The allocation has less budget left than this job's estimate."))
        return EstimateOut(allowed=not denials, denials=denials,
                           estimated_cost=Money(unit=alloc.unit, amount=to_units(prep.estimate) or 0.0),
                           remaining=Money(unit=alloc.unit, amount=to_units(remaining) or 0.0))
    return EstimateOut(allowed=False, denials=denials, estimated_cost=None, remaining=None)


def _place(session: Session, settings: Settings, registry: AdapterRegistry, principal: Principal,
           body: JobRequest) -> placement.Placement:
    """Gather the candidates in ``session``, commit (no connection held while the
    clusters are asked), then probe and choose."""
    user = get_or_create_user(session, principal.name, principal.email)
    project, _ = visible_project(session, principal, body.project)
    candidates, adapters = placement.gather(session, settings=settings, registry=registry, user=user,
                                            project=project, body=body,
                                            is_quota_manager=principal.is_quota_manager)
    session.commit()
    for cand in candidates:  # what --test-only is asked (dependencies: checked at reservation)
        if cand.probe is not None:
            cand.spec = job_spec(cand.probe.request, tag="0" * 32, username=cand.probe.username,
                                 account=cand.probe.account, partition=cand.partition)
    placed = placement.plan(candidates, adapters, settings=settings)
    for cand in placed.candidates:  # as a submission that cannot connect: fail fast for the next ones
        if cand.unreachable:
            trip_breaker(session, cluster_id=cand.cluster_id, detail=f"placement probe: {cand.denials[-1].detail}")
    session.commit()
    return placed


def _refuse_placement(placed: placement.Placement) -> EligibilityDenied:
    """One refusal listing every candidate's reasons."""
    DENIALS.labels("no_eligible_cluster").inc()
    return EligibilityDenied(placed.reason, code="no_eligible_cluster",
                             candidates=[c.model_dump(mode="json") for c in placed.out().candidates])


#: called with the session and job id inside the transaction that writes the job row
LinkIntent = Callable[[Session, str], None]


@dataclass(frozen=True)
class SubmitResult:
    status: int
    #: the answer: a :class:`JobOut`'s fields and values as JSON-ready data (built
    #: without the model: see :func:`_fresh_answer`)
    body: dict[str, Any]
    #: the answer was handed to ``keep`` in the transaction that recorded the scheduler id
    kept: bool = False

    @property
    def job(self) -> JobOut:
        """The answer as its model."""
        return JobOut.model_validate(self.body)


#: called with the session and the 201 answer inside the transaction that records the
#: scheduler's id (the idempotency key stores its answer there: one commit, not two)
KeepAnswer = Callable[[Session, SubmitResult], None]


def _reserve(
    engine: Engine, settings: Settings, principal: Principal, body: JobRequest, link: LinkIntent | None = None,
) -> tuple[Job, JobSpec, ClusterRow]:
    """The reservation step alone (tests simulate a crash right after it)."""
    job_id, spec, cluster, _ = _reserve_answer(engine, settings, principal, body, link)
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job, spec, cluster


@dataclass(frozen=True)
class _Admitted:
    """A request that passed admission: the job row to write and what to submit."""

    user: UserRow
    prep: Prepared
    cluster: ClusterRow
    allocation: AllocationRow
    request: EffectiveRequest
    dependency: str | None
    #: the job row's columns, as inserted (None: left NULL)
    row: dict[str, Any]


def _admit(session: Session, settings: Settings, principal: Principal, body: JobRequest,
           placed: dict[str, Any] | None) -> _Admitted:
    """Eligibility, cluster state and the job row to write (reads only, except the
    caller's user row on first sight); raises the refusal the caller gets."""
    user, prep = _prepare_for(session, settings, principal, body)
    if prep.denials:
        first = prep.denials[0]
        DENIALS.labels(first.code).inc()
        raise EligibilityDenied(first.detail, code=first.code,
                                denials=[{"code": d.code, "detail": d.detail} for d in prep.denials])
    cluster, alloc = prep.cluster, prep.allocation
    assert cluster is not None and alloc is not None and prep.account_username is not None
    if cluster.state != "online":
        raise ClusterUnavailable(f"Cluster {cluster.name} is {cluster.state}.", retry_after=300)
    wait = breaker_retry_after(cluster)
    if wait is not None:  # fail fast: nothing reserved, no connection attempt
        raise ClusterUnavailable(f"Cluster {cluster.name} does not answer (since "
                                 f"{cluster.unreachable_since:%H:%M:%S} UTC: {cluster.health_detail}); "
                                 "try again later.", retry_after=wait)
    req = prep.request
    assert req is not None
    dependency = _scheduler_dependency(session, req, user=user, cluster=cluster)
    record = {"project": body.project, "cluster": cluster.name, "script": body.script, **req.record()}
    if body.notify is not None:  # never the secret
        record["notify"] = {"url": body.notify.url, "on": body.notify.on}
    now = utcnow()
    # the row as a plain mapping, inserted with one Core statement: building a table
    # model and flushing it through the unit of work cost more CPU than the rest
    row: dict[str, Any] = {
        "id": uuid.uuid4().hex, "project_id": prep.project.id or 0, "cluster_id": cluster.id or 0,
        "user_id": user.id or 0, "allocation_id": alloc.id or 0, "name": req.name,
        "partition": prep.partition, "request": record, "username": prep.account_username,
        "account": alloc.account, "state": JobState.ACCEPTED.value, "unit": alloc.unit,
        "estimated": prep.estimate, "reserved": prep.estimate, "alloc_tres": {}, "created_at": now,
        "submit_attempted_at": now, "placement": placed,
        "array_counts": None if req.array is None else arrays.initial_counts(req.array)}
    return _Admitted(user, prep, cluster, alloc, req, dependency, row)


def _reserve_answer(
    engine: Engine, settings: Settings, principal: Principal, body: JobRequest, link: LinkIntent | None,
    placed: dict[str, Any] | None = None,
) -> tuple[str, JobSpec, ClusterRow, dict[str, Any]]:
    """Check and reserve, committed: the job row ``ACCEPTED``, its event, its reserve
    ledger row and the allocation's balance. Returns the job's id, what to submit,
    the cluster and the answer as committed.

    On PostgreSQL a plain job (no idempotency key, no webhook, not an array) is read
    and written in autocommit, the writes as one statement
    (broker/services/single_statement.py): two round trips in all. Otherwise one
    transaction writes them."""
    if link is None and body.notify is None and engine.dialect.name == "postgresql":
        with autocommit_session(engine) as session:
            admitted = _admit(session, settings, principal, body, placed)
            if admitted.request.array is None:
                alloc, estimate = admitted.allocation, admitted.prep.estimate
                if not single_statement.reserve_job(session, job=admitted.row, amount=estimate,
                                                    actor=admitted.user.name, at=admitted.row["created_at"]):
                    DENIALS.labels("quota_exceeded").inc()
                    raise _quota_answer(session, alloc, estimate)
                return _accepted(admitted)
        # an array job: its task rows are written with it, in the transaction below
    with session_scope(engine) as session:
        admitted = _admit(session, settings, principal, body, placed)
        user, alloc, row, req = admitted.user, admitted.allocation, admitted.row, admitted.request
        estimate = admitted.prep.estimate
        insert_values(session, Job, row)
        job_id = row["id"]
        events.record(session, job_id=job_id, project_id=row["project_id"], user_id=row["user_id"],
                      state=JobState.ACCEPTED.value, previous=None)
        if body.notify is not None:  # checked here: a refused URL reserves nothing
            job_webhooks.attach(session, settings, job_id=job_id, notify=body.notify)
        if link is not None:
            link(session, job_id)  # same transaction: the job exists iff its key knows it
        if req.array is not None:  # one row per task, each with its share of the reservation
            arrays.create_tasks(session, job_id=job_id, reserved=row["reserved"], spec=req.array)
        # Everything else is written before the reservation: the allocation's row lock,
        # which every submission on this allocation queues for, is then held only from
        # the reserving statement to the commit (no statement and no Python in between).
        events.flush(session)
        try:
            ledger.reserve(session, allocation=alloc, amount=estimate, job_id=job_id,
                           user_id=user.id, actor=user.name)
        except QuotaExceeded as exc:
            DENIALS.labels("quota_exceeded").inc()
            raise _quota_answer(session, alloc, estimate) from exc
    return _accepted(admitted)


def _accepted(admitted: _Admitted) -> tuple[str, JobSpec, ClusterRow, dict[str, Any]]:
    """The job's id, what to submit and the answer as committed (no reload: names are
    known here, values set by us)."""
    prep, row, alloc = admitted.prep, admitted.row, admitted.allocation
    assert prep.account_username is not None
    spec = job_spec(admitted.request, tag=row["id"], username=prep.account_username, account=alloc.account,
                    partition=prep.partition, dependency=admitted.dependency)
    accepted = _fresh_answer(row, project=prep.project.code, cluster=admitted.cluster.name, user=admitted.user.name)
    return row["id"], spec, admitted.cluster, accepted


def _fresh_answer(row: dict[str, Any], *, project: str, cluster: str, user: str) -> dict[str, Any]:
    """The job row just written (its columns as inserted) as :func:`_answer` answers
    a row read back: :class:`JobOut`'s fields in its order with the values the model
    would hold, as plain data (tests/integration/test_submit_answer.py compares them
    with the model's and with ``GET``'s). Building the model, copying it with the
    scheduler's id and dumping it was a tenth of a submission's CPU."""
    unit, request = row["unit"], row["request"]
    return {
        "id": row["id"], "project": project, "cluster": cluster, "user": user, "name": row["name"],
        "partition": row["partition"], "state": row["state"], "raw_state": None, "scheduler_job_id": None,
        "estimated_cost": _money(unit, row["estimated"]), "reserved": _money(unit, row["reserved"]),
        "charged": None, "elapsed_seconds": None, "submitted_at": None, "created_at": _utc_aware(row["created_at"]),
        "started_at": None, "ended_at": None, "unknown_since": None, "exit_code": None, "reason": None,
        "request": request, "pending_reason": None, "expected_start": None, "placement": row["placement"],
        "array": _array_answer(request, row["array_counts"]),
    }


def _utc_aware(at: datetime) -> str:
    """An aware timestamp as pydantic-core writes it once in UTC (as :func:`_utc` the
    stored one)."""
    return at.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def job_spec(req: EffectiveRequest, *, tag: str, username: str, account: str, partition: str | None,
             dependency: str | None = None) -> JobSpec:
    """What the adapter submits: the effective request, nothing else (the script's
    directives neutralised, the dependency in scheduler ids)."""
    return JobSpec(tag=tag, username=username, account=account, script=req.script,
                   time_limit_minutes=req.time_limit_minutes, name=req.name, partition=partition,
                   nodes=req.nodes, ntasks_per_node=req.ntasks_per_node, cpus_per_task=req.cpus_per_task,
                   gpus_per_node=req.gpus_per_node, memory_per_node_mb=req.memory_per_node_mb,
                   environment=dict(req.environment), working_directory=req.working_directory,
                   ntasks=req.ntasks, min_nodes=req.min_nodes, gpu_type=req.gpu_type, exclusive=req.exclusive,
                   constraint=req.constraint, mail_type=req.mail_type, mail_user=req.mail_user,
                   array=req.array.text if req.array else None, dependency=dependency)


def _reserve_placed(
    engine: Engine, settings: Settings, registry: AdapterRegistry, principal: Principal, body: JobRequest,
    link: LinkIntent | None,
) -> tuple[str, JobSpec, ClusterRow, dict[str, Any]]:
    with session_scope(engine) as session:
        placed = _place(session, settings, registry, principal, body)
    order = placement.ranked(placed, settings=settings)
    if not order:
        raise _refuse_placement(placed)
    for i, cand in enumerate(order):
        assert cand.body is not None
        record = placed.record()
        if i:  # the first choice could not be reserved: say so on the job
            record["chosen"] = cand.cluster
            record["reason"] = (f"{cand.cluster}: the policy's first choice(s) "
                                f"{', '.join(c.cluster for c in order[:i])} could not be reserved any more. "
                                + placed.reason)
        try:
            return _reserve_answer(engine, settings, principal, cand.body, link, record)
        except (QuotaExceeded, ClusterUnavailable, EligibilityDenied) as exc:
            log.info("placement: %s no longer possible (%s); trying the next candidate", cand.cluster, exc.code)
            cand.denials.append(Denial(exc.code, exc.detail))
    placed.chosen, placed.reason = None, placement.explain(None, placed.candidates, placed.policy)
    raise _refuse_placement(placed)


def _quota_answer(session: Session, alloc: AllocationRow, estimate: int) -> QuotaExceeded:
    """The refusal a user can act on: what the job would cost and what is left now."""
    # the conditional update lost: read the balance it lost against
    table = ledger.ALLOCATIONS
    remaining = session.execute(sa.select(table.c.granted - table.c.charged - table.c.reserved)
                                .where(table.c.id == alloc.id)).scalar_one()
    cost = Money(unit=alloc.unit, amount=to_units(estimate) or 0.0)
    left = Money(unit=alloc.unit, amount=to_units(remaining) or 0.0)
    return QuotaExceeded(
        f"This job's estimate is {cost.amount:g} {cost.unit} but the allocation has {left.amount:g} "
        f"{left.unit} left (granted − charged − reserved by running jobs).",
        estimated_cost=cost.model_dump(), remaining=left.model_dump(), allocation_id=alloc.id)


def _scheduler_dependency(session: Session, req: EffectiveRequest, *, user: UserRow,
                          cluster: ClusterRow) -> str | None:
    """``--dependency`` with each broker job id replaced by its scheduler id. The jobs
    must be the caller's own, on the same cluster, and already on the scheduler."""
    if req.dependency is None:
        return None
    ids: dict[str, str] = {}
    for job_id in req.dependency.job_ids:
        other = session.get(Job, job_id)
        if other is None or other.user_id != user.id or other.cluster_id != cluster.id:
            raise InvalidRequest(f"--dependency names job {job_id}, which is not one of your jobs on "
                                 f"{cluster.name}.", code="invalid_dependency")
        if other.scheduler_job_id is None:
            raise InvalidRequest(f"--dependency names job {job_id}, which has not reached {cluster.name} "
                                 f"({other.state}).", code="invalid_dependency")
        ids[job_id] = other.scheduler_job_id
    return req.dependency.render(ids)


def submit(
    *, engine: Engine, settings: Settings, registry: AdapterRegistry, principal: Principal,
    body: JobRequest, link: LinkIntent | None = None, keep: KeepAnswer | None = None,
) -> SubmitResult:
    """Check, reserve, submit and record one job. See the module docstring.

    ``link(session, job_id)`` runs in the transaction that writes the job row (the
    idempotency claim records the job there); raising from it writes nothing.
    ``keep(session, answer)`` runs in the transaction that records the scheduler's id,
    with the 201 answer (then ``kept`` is set on the result).

    ``cluster: auto``: placement chooses the cluster (broker.services.placement) and
    only its allocation is reserved; if its budget or state changed since, the next
    candidate in the policy's order is tried."""
    if body.cluster == placement.AUTO:
        job_id, spec, cluster, accepted = _reserve_placed(engine, settings, registry, principal, body, link)
    else:
        job_id, spec, cluster, accepted = _reserve_answer(engine, settings, principal, body, link)
    try:
        ref = adapter_for(registry, cluster).submit(spec)
    except SubmitOutcomeUnknown as exc:
        log.warning("submit of job %s on %s: outcome unknown (%s); reconciling", job_id, cluster.name, exc)
        SUBMIT_ERRORS.labels(cluster.name, exc.code).inc()
        return SubmitResult(202, accepted)
    except AdapterError as exc:
        SUBMIT_ERRORS.labels(cluster.name, exc.code).inc()
        mark_submit_failed(engine, job_id=job_id, reason=f"{exc.code}: {exc}")
        if isinstance(exc, ClusterUnreachable):
            with session_scope(engine) as session:
                trip_breaker(session, cluster_id=cluster.id or 0, detail=f"submit: {exc}")
        if exc.transient:
            raise ClusterUnavailable(f"Cluster {cluster.name} cannot take jobs right now: {exc}",
                                     retry_after=30, job_id=job_id) from exc
        raise SubmitFailed(f"Cluster {cluster.name} refused the job: {exc}", code=exc.code,
                           job_id=job_id) from exc
    except Exception:
        # unexpected adapter bug: the job may or may not exist; leave it to reconciliation
        log.exception("adapter %s failed unexpectedly submitting job %s", cluster.name, job_id)
        SUBMIT_ERRORS.labels(cluster.name, "adapter_bug").inc()
        return SubmitResult(202, accepted)
    submitted_at = ref.submit_time or utcnow()
    moved = {**accepted, "state": JobState.PENDING.value, "scheduler_job_id": ref.job_id,
             "submitted_at": _utc_aware(submitted_at)}
    if moved["array"] is not None:  # every task moves with the job (arrays.mark_submitted)
        moved["array"] = {**moved["array"], "counts": {JobState.PENDING.value: moved["array"]["tasks"]}}
    answer = SubmitResult(201, moved, kept=keep is not None)
    recorded = record_submitted(engine, job_id=job_id, ref=ref, submitted_at=submitted_at,
                                then=None if keep is None else lambda session: keep(session, answer),
                                plain=spec.array is None)
    SUBMISSIONS.labels(cluster.name).inc()
    if recorded is None:  # the reconciler recorded it first: answer what it wrote
        return SubmitResult(201, _load_out(engine, job_id).model_dump(mode="json"))
    return answer


def answer_for(engine: Engine, *, job_id: str) -> SubmitResult:
    """The submission answer for an existing job: 201 once the scheduler has it, else 202."""
    out = _load_out(engine, job_id)
    return SubmitResult(201 if out.scheduler_job_id is not None else 202, out.model_dump(mode="json"))


def _load_out(engine: Engine, job_id: str) -> JobOut:
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job_out_loaded(session, job)


def record_submitted(engine: Engine, *, job_id: str, ref: SchedulerJobRef, submitted_at: datetime | None = None,
                     then: Callable[[Session], None] | None = None, plain: bool = False) -> datetime | None:
    """ACCEPTED → PENDING with the scheduler id; the recorded submit time, or None if
    another path got there first. ``then(session)`` runs in the same transaction
    when the job moved. ``plain``: the caller knows the job is no array job; then,
    without ``then``, PostgreSQL records it in one statement
    (broker/services/single_statement.py)."""
    submitted_at = submitted_at or ref.submit_time or utcnow()
    if plain and then is None and engine.dialect.name == "postgresql":
        with autocommit_connection(engine) as conn:
            recorded = single_statement.record_submitted(conn, job_id=job_id, scheduler_job_id=ref.job_id,
                                                         at=submitted_at)
        return submitted_at if recorded else None
    with session_scope(engine) as session:
        moved = session.execute(_record_submitted_statement(), {
            "job_id": job_id, "sched_id": ref.job_id, "at": submitted_at}).first()
        if moved is None:
            return None
        if (moved[2] or {}).get("array"):
            arrays.mark_submitted(session, job_id=job_id, scheduler_job_id=ref.job_id)
        events.record(session, job_id=job_id, project_id=moved[0], user_id=moved[1],
                      state=JobState.PENDING.value, previous=JobState.ACCEPTED.value)
        if then is not None:
            then(session)
        return submitted_at


@functools.cache
def _record_submitted_statement() -> sa.Update:
    """Built once (building it cost more CPU than running it)."""
    table = Job.__table__  # type: ignore[attr-defined]
    return (sa.update(table).where(table.c.id == sa.bindparam("job_id"),
                                   table.c.state == JobState.ACCEPTED.value, table.c.scheduler_job_id.is_(None))
            .values(state=JobState.PENDING.value, scheduler_job_id=sa.bindparam("sched_id"),
                    submitted_at=sa.bindparam("at", type_=UTCDateTime))
            .returning(table.c.project_id, table.c.user_id, table.c.request))


def mark_submit_failed(engine: Engine, *, job_id: str, reason: str) -> bool:
    """ACCEPTED → SUBMIT_FAILED, releasing the whole reservation (nothing ran)."""
    status = JobStatus(job_id="", state=JobState.SUBMIT_FAILED, raw_state="SUBMIT_FAILED", final=True,
                       reason=reason[:2000])
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.ACCEPTED.value:
            return False
        return settle(session, job=job, status=status, cost_model={})


# --- read and cancel ------------------------------------------------------------------------

#: a job id prefix the caller may type instead of the whole id (ids are 32 hex digits)
JOB_ID_PREFIX_RE = re.compile(r"^[0-9a-f]{4,31}$")
MIN_JOB_ID_PREFIX = 4


def _job_by_prefix(session: Session, principal: Principal, prefix: str) -> Job | None:
    """The one job the caller may see whose id starts with ``prefix``.

    Only visible jobs are matched, so neither the answer nor an ambiguity says
    anything about other projects' jobs."""
    q = select(Job).where(col(Job.id).startswith(prefix, autoescape=True))
    q = _visible_to(q, principal)
    found = session.exec(q.order_by(col(Job.id)).limit(2)).all()
    if len(found) > 1:
        raise AmbiguousJobId(f"More than one of your jobs starts with {prefix}: give more characters of the id.")
    return found[0] if found else None


def _visible_job(session: Session, principal: Principal, job_id: str) -> Job:
    """The job if the caller is its owner, a PI of its project or a quota manager; else 404.

    ``job_id`` is the whole id or a unique prefix of it (at least 4 characters)
    among the jobs the caller may see."""
    job = session.get(Job, job_id) if len(job_id) <= 64 else None
    if job is None and JOB_ID_PREFIX_RE.match(job_id.lower()):
        job = _job_by_prefix(session, principal, job_id.lower())
    if job is None:
        raise NotFound(f"No job {job_id}.")
    if principal.is_quota_manager or _owner_or_pi(session, principal, job):
        return job
    raise NotFound(f"No job {job_id}.")


def _owner_or_pi(session: Session, principal: Principal, job: Job) -> bool:
    """The one "owner or PI" rule: the caller submitted the job or is a PI of its project."""
    user = find_user(session, principal.name)
    if user is not None and job.user_id == user.id:
        return True
    project = session.get(Project, job.project_id)
    assert project is not None
    try:
        _, role = visible_project(session, principal, project.code)
    except NotFound:
        return False
    return role == "pi"


def get_job(session: Session, *, principal: Principal, job_id: str) -> JobOut:
    """One job the caller may see (else 404), as :func:`get_job_answer` finds it."""
    return JobOut.model_validate(get_job_answer(session, principal=principal, job_id=job_id))


def get_job_answer(session: Session, *, principal: Principal, job_id: str) -> dict[str, Any]:
    """One job in one query (its names joined, visibility in the WHERE); else 404 —
    as JSON-ready data with the fields and values of its :class:`JobOut` (what
    ``GET /v1/jobs/{id}`` answers). An id prefix is looked up as :func:`_visible_job` does."""
    row = _one_job_statement(principal.is_quota_manager).first(session, {"job_id": job_id, "me": principal.name}) \
        if len(job_id) <= 64 else None
    if row is None:  # a unique prefix of an id (typed by a person): the longer path
        return job_out_loaded(session, _visible_job(session, principal, job_id)).model_dump()
    return _answer(row)


@functools.cache
def _one_job_statement(quota_manager: bool) -> Statement:
    """Built once (building a statement costs more CPU than running this one); run on
    the driver's cursor on PostgreSQL (broker/direct.py)."""
    caller = Principal(name="", roles=frozenset({"quota_manager"} if quota_manager else set()))
    jobs = Job.__table__  # type: ignore[attr-defined]
    return Statement(_visible_to(_job_rows(), caller, me=sa.bindparam("me"))
                     .where(jobs.c.id == sa.bindparam("job_id")))


#: the job columns an answer shows (:func:`job_out` reads them by name from a row)
_OUT_COLUMNS = ("id", "name", "partition", "state", "raw_state", "scheduler_job_id", "unit", "estimated",
                "reserved", "charged", "elapsed_seconds", "submitted_at", "created_at", "started_at",
                "ended_at", "unknown_since", "exit_code", "reason", "request", "pending_reason",
                "expected_start_at", "placement", "array_counts")


#: read as their text, parsed by pydantic-core in :func:`_answer` (psycopg's and
#: SQLAlchemy's JSON loading goes through ``json.loads``' Python layers: ~2× the CPU)
_JSON_COLUMNS = frozenset({"request", "placement", "array_counts"})
#: naive UTC as stored, written as text by :func:`_answer` (the UTC type's Python
#: processing of every value, 6 per row, was a tenth of a job list's own CPU)
_TIME_COLUMNS = frozenset({"submitted_at", "created_at", "started_at", "ended_at", "unknown_since",
                           "expected_start_at"})


def _out_column(jobs: sa.Table, name: str) -> Any:
    """Column ``name`` of a job as :func:`_answer` reads it."""
    if name in _JSON_COLUMNS:
        return sa.cast(jobs.c[name], sa.Text).label(name)
    if name in _TIME_COLUMNS:
        return sa.type_coerce(jobs.c[name], sa.DateTime).label(name)
    return jobs.c[name]


def _job_rows() -> Any:
    """Jobs with the names the API shows (project code, cluster and user name), as
    plain rows of the columns an answer needs: reads load no ORM objects. Tables'
    own columns, not the models' attributes: a statement of ORM attributes runs
    through the ORM's compile and result layers on every execution."""
    jobs, projects, clusters, users = _tables()
    return (sa.select(*(_out_column(jobs, c) for c in _OUT_COLUMNS), projects.c.code.label("project_code"),
                      clusters.c.name.label("cluster_name"), users.c.name.label("user_name"))
            .select_from(jobs)
            .join(projects, projects.c.id == jobs.c.project_id)
            .join(clusters, clusters.c.id == jobs.c.cluster_id)
            .join(users, users.c.id == jobs.c.user_id))


def _tables() -> tuple[sa.Table, sa.Table, sa.Table, sa.Table]:
    """The tables of jobs, projects, clusters and users (Core)."""
    return (Job.__table__, Project.__table__, Cluster.__table__, User.__table__)  # type: ignore[attr-defined]


#: a row of :func:`_job_rows`, by position
_ROW_KEYS = (*_OUT_COLUMNS, "project_code", "cluster_name", "user_name")


def _answer(row: Any) -> dict[str, Any]:
    """A row of :func:`_job_rows` as :func:`job_out` would answer it, as plain data:
    JobOut's fields in its order, each value as the model holds it, so pydantic-core
    writes the same JSON (tests/integration/test_read_answers.py compares them). Building
    and validating a model per job (and reading a row by attribute) was most of a
    job list's CPU."""
    # unpacked by position (_ROW_KEYS' order): a dict of the row per job was a fifth of
    # this function's time
    (job_id, name, partition, state, raw_state, scheduler_job_id, unit, estimated, reserved, charged,
     elapsed_seconds, submitted_at, created_at, started_at, ended_at, unknown_since, exit_code, reason,
     request_text, pending_reason, expected_start_at, placement, array_counts,
     project_code, cluster_name, user_name) = row
    request = _json(request_text)
    return {
        "id": job_id, "project": project_code, "cluster": cluster_name, "user": user_name,
        "name": name, "partition": partition, "state": state, "raw_state": raw_state,
        "scheduler_job_id": scheduler_job_id, "estimated_cost": _money(unit, estimated),
        "reserved": _money(unit, reserved), "charged": None if charged is None else _money(unit, charged),
        "elapsed_seconds": elapsed_seconds, "submitted_at": _utc(submitted_at), "created_at": _utc(created_at),
        "started_at": _utc(started_at), "ended_at": _utc(ended_at), "unknown_since": _utc(unknown_since),
        "exit_code": exit_code, "reason": reason, "request": request, "pending_reason": pending_reason,
        "expected_start": _utc(expected_start_at), "placement": _json(placement),
        "array": _array_answer(request, _json(array_counts)),
    }


def _utc(naive: datetime | None) -> str | None:
    """A stored (naive UTC) timestamp as pydantic-core writes the aware one: ISO 8601,
    microseconds when not 0, ``Z``."""
    return None if naive is None else naive.isoformat() + "Z"


def _json(text: str | None) -> Any:
    """A JSON column's text as data (as ``json.loads`` reads it)."""
    if text is None:
        return None
    try:
        return pydantic_core.from_json(text)
    except ValueError:  # what json.loads reads and pydantic-core refuses (a lone surrogate escape)
        return json.loads(text)


def _money(unit: str, micro: int) -> dict[str, Any]:
    """A :class:`Money` as data (as :func:`job_out` builds it)."""
    return {"unit": unit, "amount": to_units(micro) or 0.0}


def _array_answer(request: dict[str, Any] | None, counts: dict[str, Any] | None) -> dict[str, Any] | None:
    """An array job's ``array`` object as data; None for a plain job."""
    if not (request or {}).get("array"):
        return None
    out = arrays.array_out(SimpleNamespace(request=request, array_counts=counts))
    return None if out is None else out.model_dump()


def _visible_to(q: Any, principal: Principal, me: Any = None) -> Any:
    """Restrict ``q`` to the jobs ``principal`` may see — own jobs, jobs of projects
    they are PI of; quota managers all — as subqueries (no lookups of their own)."""
    if principal.is_quota_manager:
        return q
    jobs = Job.__table__  # type: ignore[attr-defined]
    members = Membership.__table__  # type: ignore[attr-defined]
    caller = User.__table__.alias("caller")  # type: ignore[attr-defined]  # not the joined users
    my_id = (sa.select(caller.c.id).where(caller.c.name == (principal.name if me is None else me))
             .scalar_subquery())
    pi_projects = sa.select(members.c.project_id).where(members.c.user_id == my_id, members.c.role == "pi")
    return q.where(sa.or_(jobs.c.user_id == my_id, jobs.c.project_id.in_(pi_projects)))


def cancel_job(session: Session, *, principal: Principal, registry: AdapterRegistry, job_id: str) -> JobOut:
    """Ask the cluster to cancel; the tracker settles when the scheduler confirms."""
    job = _visible_job(session, principal, job_id)
    if principal.is_quota_manager and not _owner_or_pi(session, principal, job):
        raise Forbidden("Only the job's owner or the project's PI can cancel it.")
    if job.state in {s.value for s in TERMINAL_STATES}:
        return job_out_loaded(session, job)
    if job.scheduler_job_id is None:
        raise Conflict("The job is being submitted; try again in a few seconds.")
    _cancel_at_scheduler(session, registry, job, job.scheduler_job_id, what="job")
    if arrays.is_array(job):
        # the tasks before the job row: the tracker locks them in this order (arrays.refresh),
        # and the opposite order deadlocked with it on PostgreSQL (the cancel answered 503)
        arrays.note_cancel(session, job_id=job.id)
    job.reason = f"cancel requested by {principal.name}"
    session.add(job)
    return job_out_loaded(session, job)


def _cancel_at_scheduler(session: Session, registry: AdapterRegistry, job: Job, scheduler_job_id: str,
                         *, what: str) -> None:
    """``scancel`` (or the adapter's equivalent) of a job or one array task; an
    unreachable cluster is 503, a refusal 422 (``SubmitFailed``)."""
    cluster = session.get(Cluster, job.cluster_id)
    assert cluster is not None
    try:
        adapter_for(registry, cluster).cancel(
            SchedulerJobRef(job_id=scheduler_job_id, username=job.username, tag=job.id))
    except AdapterError as exc:
        if exc.transient:
            raise ClusterUnavailable(f"Cluster {cluster.name} cannot be reached: {exc}",
                                     retry_after=30) from exc
        raise SubmitFailed(f"The cluster refused to cancel the {what}: {exc}", code=exc.code) from exc


def _visible_task(session: Session, principal: Principal, job_id: str, task: int) -> tuple[Job, JobTask]:
    """The caller's array job and one of its tasks; 404 for another project's job,
    a plain job or a task the array does not have."""
    job = _visible_job(session, principal, job_id)
    row = session.exec(select(JobTask).where(JobTask.job_id == job.id, JobTask.task == task)).first()
    if row is None:
        raise NotFound(f"Job {job_id} has no array task {task}." if arrays.is_array(job)
                       else f"Job {job_id} is not an array job (it has no tasks).", code="task_not_found")
    return job, row


def list_tasks(session: Session, *, principal: Principal, job_id: str) -> JobTaskPage:
    """Every task of an array job, in task order (a plain job has none: 404)."""
    job = _visible_job(session, principal, job_id)
    if not arrays.is_array(job):
        raise NotFound(f"Job {job_id} is not an array job (it has no tasks).", code="task_not_found")
    rows = session.exec(select(JobTask).where(JobTask.job_id == job.id).order_by(col(JobTask.task))).all()
    return JobTaskPage(items=[arrays.task_out(job, t) for t in rows])


def cancel_task(
    session: Session, *, principal: Principal, registry: AdapterRegistry, job_id: str, task: int,
) -> JobTaskOut:
    """Cancel one task of an array job; the tracker settles it (releasing its share
    of the reservation) when the scheduler confirms. The other tasks go on."""
    job, row = _visible_task(session, principal, job_id, task)
    if principal.is_quota_manager and not _owner_or_pi(session, principal, job):
        raise Forbidden("Only the job's owner or the project's PI can cancel it.")
    if row.state in {s.value for s in TERMINAL_STATES} or row.settled_at is not None:
        return arrays.task_out(job, row)
    if job.scheduler_job_id is None:
        raise Conflict("The job is being submitted; try again in a few seconds.")
    _cancel_at_scheduler(session, registry, job, f"{job.scheduler_job_id}_{task}", what="task")
    row.reason = f"cancel requested by {principal.name}"
    row.cancel_requested_at = row.cancel_requested_at or utcnow()
    session.add(row)
    return arrays.task_out(job, row)


def _output_ref(job: Job, task: int | None) -> SchedulerJobRef:
    """Whose output to read: the job's, or one array task's (default: the first)."""
    assert job.scheduler_job_id is not None
    spec = arrays.array_spec(job)
    if spec is None:
        if task is not None:
            raise NotFound(f"Job {job.id} is not an array job (it has no tasks).", code="task_not_found")
        return SchedulerJobRef(job_id=job.scheduler_job_id, username=job.username, tag=job.id)
    if task is None:
        task = spec.task_ids[0]
    elif task not in spec.task_ids:
        raise NotFound(f"Job {job.id} has no array task {task}.", code="task_not_found")
    return SchedulerJobRef(job_id=f"{job.scheduler_job_id}_{task}", username=job.username, tag=job.id)


def read_output(
    session: Session, *, principal: Principal, registry: AdapterRegistry, job_id: str, stream: str, tail: int,
    task: int | None = None,
) -> str:
    """The tail of the job's stdout/stderr where the adapter can read it (owner or PI)."""
    job = _visible_job(session, principal, job_id)
    if principal.is_quota_manager and not _owner_or_pi(session, principal, job):
        raise Forbidden("Only the job's owner or the project's PI can read its output.")
    if job.scheduler_job_id is None:
        raise Conflict("The job has not reached the cluster yet.")
    cluster = session.get(Cluster, job.cluster_id)
    assert cluster is not None
    ref = _output_ref(job, task)
    try:
        return adapter_for(registry, cluster).read_output(ref, stream, tail)
    except AdapterError as exc:
        if exc.transient:
            raise ClusterUnavailable(f"Cluster {cluster.name} cannot be reached: {exc}", retry_after=30) from exc
        raise Conflict(f"The output cannot be read: {exc}", code=exc.code) from exc


def output_location(session: Session, *, registry: AdapterRegistry, job_id: str, stream: str,
                    task: int | None = None) -> str | None:
    """Where the job's output file is (call after :func:`read_output` checked access)."""
    job = session.get(Job, job_id)
    if job is None or job.scheduler_job_id is None:
        return None
    cluster = session.get(Cluster, job.cluster_id)
    if cluster is None:
        return None
    ref = _output_ref(job, task)
    try:
        return adapter_for(registry, cluster).output_location(ref, stream)
    except AdapterError:
        return None


# --- listing ------------------------------------------------------------------------------------

def _encode_cursor(created: datetime, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created.isoformat()}|{job_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        if len(job_id) > 64 or not job_id.isalnum():  # the database never sees what no id can be
            raise ValueError("bad job id in cursor")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or not 1970 <= when.year <= 9000:  # cursors come from UTC timestamps
            raise ValueError("forged timestamp in cursor")
        return when, job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest("The cursor is not valid; start again without it.") from exc


def list_jobs(
    session: Session, *, principal: Principal, project: str | None, state: str | None,
    cluster: str | None, user: str | None, limit: int, cursor: str | None,
) -> dict[str, Any]:
    """Jobs the caller may see, newest first. Members see their own jobs, PIs their
    project's, quota managers all. A :class:`JobPage` as JSON-ready data (its
    fields and values, no model built; see :func:`_answer`)."""
    params: dict[str, Any] = {"me": principal.name, "limit": limit + 1, "project": project,
                              "cluster": cluster, "user": user}
    if state:
        params["state"] = parse_state(state)
    if cursor:
        params["created"], params["last_id"] = _decode_cursor(cursor)
    q = _list_statement(principal.is_quota_manager, bool(project), bool(state), bool(cluster), bool(user),
                        bool(cursor), session.get_bind().dialect.name == "postgresql")
    rows = q.rows(session, params)  # one query, whatever the page size
    items = [_answer(r) for r in rows[:limit]]
    last = dict(zip(_ROW_KEYS, rows[limit - 1], strict=True)) if len(rows) > limit else None
    nxt = None if last is None else _encode_cursor(last["created_at"].replace(tzinfo=UTC), last["id"])
    return {"items": items, "next_cursor": nxt}


@functools.cache
def _list_statement(quota_manager: bool, project: bool, state: bool, cluster: bool, user: bool,
                    cursor: bool, lateral: bool) -> Statement:
    """The listing for one combination of filters, built once (values are parameters);
    run on the driver's cursor on PostgreSQL (broker/direct.py).

    Each page is read in index order and bounded by its size, however many jobs the
    caller may see: "own jobs OR jobs of projects I lead" in one condition makes the
    database read every visible job and sort them. Instead the page is the newest
    ``limit`` keys of a UNION ALL of bounded branches — the caller's own jobs (through
    ix_jobs_user_created_id), and, per project the caller leads, that project's jobs of
    other users (ix_jobs_project_created_id) — and only those jobs are read, with their
    names. Quota managers see every job: one branch (ix_jobs_created_id).

    ``lateral``: the per-project branch as a LATERAL subquery (PostgreSQL), each
    project's newest ``limit`` read through its index; SQLite has no LATERAL, so
    there the branch is one ``project_id IN (...)`` (same rows, sorted)."""
    jobs = Job.__table__  # type: ignore[attr-defined]
    if quota_manager:
        branches = [_page(jobs, project, state, cluster, user, cursor)]
    else:
        members = Membership.__table__  # type: ignore[attr-defined]
        my_id = _user_id(sa.bindparam("me"))
        led = members.c.user_id == my_id, members.c.role == "pi"
        mine = _page(jobs, project, state, cluster, user, cursor).where(jobs.c.user_id == my_id)
        if lateral:
            theirs = (_page(jobs, project, state, cluster, user, cursor)
                      .where(jobs.c.project_id == members.c.project_id, jobs.c.user_id != my_id)
                      .lateral("led_jobs"))
            others = sa.select(*theirs.c).select_from(members).join(theirs, sa.true()).where(*led)
        else:
            others = (_page(jobs, project, state, cluster, user, cursor)
                      .where(jobs.c.project_id.in_(sa.select(members.c.project_id).where(*led)),
                             jobs.c.user_id != my_id))
        branches = [mine, others]
    # each branch as a subquery: SQLite takes no ORDER BY/LIMIT on a compound's member
    page = sa.union_all(*(sa.select(b.subquery().c) for b in branches)).subquery("page")
    # the branches give keys only (their indexes hold them) and the page's jobs are
    # read by id: a short statement (psycopg caches the parsing of those under 4 KiB)
    return Statement(_job_rows().join(page, page.c.id == jobs.c.id)
                     .order_by(page.c.created_at.desc(), page.c.id.desc()).limit(sa.bindparam("limit")))


def _page(jobs: sa.Table, project: bool, state: bool, cluster: bool, user: bool, cursor: bool) -> Any:
    """The keys (created_at, id) of the newest ``limit`` jobs after the cursor that
    pass the filters, in index order: names compared as their ids (a subquery each), so that an index on
    (project_id or user_id, created_at, id) reads them in order and stops at the page;
    the cursor as a row comparison, an index condition (an OR of the two is a filter
    that reads every newer job first)."""
    _, projects, clusters, _ = _tables()
    q = sa.select(jobs.c.created_at, jobs.c.id)
    if project:
        q = q.where(jobs.c.project_id == sa.select(projects.c.id).where(projects.c.code == sa.bindparam("project"))
                    .scalar_subquery())
    if state:
        q = q.where(jobs.c.state == sa.bindparam("state"))
    if cluster:
        q = q.where(jobs.c.cluster_id == sa.select(clusters.c.id).where(clusters.c.name == sa.bindparam("cluster"))
                    .scalar_subquery())
    if user:
        q = q.where(jobs.c.user_id == _user_id(sa.bindparam("user")))
    if cursor:
        q = q.where(sa.tuple_(jobs.c.created_at, jobs.c.id)
                    < sa.tuple_(sa.bindparam("created", type_=UTCDateTime), sa.bindparam("last_id")))
    return q.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(sa.bindparam("limit"))


def _user_id(name: Any) -> Any:
    """The id of the user named ``name`` (a scalar subquery; NULL, matching nothing, if none)."""
    users = User.__table__.alias("named")  # type: ignore[attr-defined]  # never correlated to a joined users
    return sa.select(users.c.id).where(users.c.name == name).scalar_subquery()
