"""Submit once: ``Idempotency-Key`` handling for job submission (**contract**).

Same key + same body → the first answer again (kept ``idempotency_ttl_hours``, with
``Idempotent-Replayed: true``); same key + another body → 422 ``idempotency_conflict``;
same key while the first request is still being processed → 409
``idempotency_in_progress`` with ``Retry-After``. Keys are per user.

How it survives crashes:

* The record is inserted *before* any work (unique on user+key), so of N concurrent
  requests exactly one holds the claim. The claim carries its ``owner`` (one id per
  request) and a short lease (``idempotency_lease_seconds``).
* The job row and the key's ``job_id`` are written in one transaction, before the
  scheduler sees anything, and only while the request still owns the claim.
* A retry that finds a claim whose lease ran out (its holder died or hangs) takes it
  over with a compare-and-set on the owner. If the key already names a job, the retry
  answers that job (201 when it has a scheduler id, else 202 while the tracker's
  reconciler settles whether it reached the cluster); otherwise it submits as the new
  owner. A dethroned holder can no longer write its job. So a key never makes two
  jobs and is never wedged longer than one lease.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from broker.auth import Principal
from broker.config import Settings
from broker.db import session_scope
from broker.errors import BrokerError, Conflict, InvalidRequest, Replayed
from broker.models import IdempotencyRecord, Job, utcnow
from broker.registry import AdapterRegistry
from broker.schemas import JobRequest
from broker.services import jobs as job_service
from broker.services.common import get_or_create_user
from broker.states import JobState

log = logging.getLogger(__name__)
MAX_KEY_LENGTH = 255
_TABLE: sa.Table = IdempotencyRecord.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Answer:
    """What to send back for a submission: status, JSON body, and whether it is a replay."""

    status: int
    body: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True)
class Claim:
    """This request holds the key: it may create the job."""

    user_id: int
    key: str
    owner: str


def request_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def validate_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters.")


def submit_once(
    *, engine: Engine, settings: Settings, registry: AdapterRegistry, principal: Principal,
    body: JobRequest, key: str | None,
) -> Answer:
    """Submit ``body`` for ``principal``; with a ``key``, at most once per key (see module doc).

    Raises the submission's domain errors (stored and replayed for the key when they
    are the client's to fix, i.e. 4xx), and :class:`~broker.errors.Replayed` for a
    stored error answer."""
    if key is None:
        result = job_service.submit(engine=engine, settings=settings, registry=registry,
                                    principal=principal, body=body)
        return Answer(result.status, result.body)
    validate_key(key)
    digest = request_hash(body.model_dump(mode="json"))
    got = begin(engine, principal=principal, key=key, digest=digest, ttl_hours=settings.idempotency_ttl_hours,
                lease_seconds=settings.idempotency_lease_seconds)
    if isinstance(got, Answer):
        return got
    claim = got
    try:
        result = job_service.submit(
            engine=engine, settings=settings, registry=registry, principal=principal, body=body,
            link=lambda session, job_id: link_job(session, claim, job_id),
            keep=lambda session, kept: _store(session, claim, status=kept.status, body=kept.body))
    except BrokerError as exc:
        if exc.status >= 500:
            _quietly(release, engine, claim)  # the client may retry with the same key
        else:
            _quietly(finish, engine, claim, status=exc.status, body=_error_record(exc))
        raise
    except BaseException:
        _quietly(release, engine, claim)
        raise
    answer = Answer(result.status, result.body)
    if not result.kept:  # else stored with the scheduler id, in one transaction
        finish(engine, claim, status=answer.status, body=answer.body)
    return answer


def _quietly(fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Book-keeping after a failure must not hide that failure; if it cannot be done
    (database gone), the claim's lease runs out and a retry takes over."""
    try:
        fn(*args, **kwargs)
    except Exception:
        log.warning("could not settle an idempotency claim after a failed submission", exc_info=True)


def begin(
    engine: Engine, *, key: str, digest: str, ttl_hours: int, lease_seconds: float,
    user_id: int | None = None, principal: Principal | None = None,
) -> Claim | Answer:
    """Claim ``key`` for this request, take over a claim whose lease ran out, or return
    the answer to give (a stored one, or the job a dead holder created).

    The key belongs to ``user_id``, or to ``principal``'s user (looked up — created on
    first sight — in the claim's own transaction)."""
    owner = uuid.uuid4().hex
    for _attempt in range(5):
        now = utcnow()
        lease_until = now + timedelta(seconds=lease_seconds)
        try:
            with session_scope(engine) as session:
                if principal is not None:
                    user_id = get_or_create_user(session, principal.name, principal.email).id or 0
                assert user_id is not None, "begin() needs user_id or principal"
                rec = _load(session, user_id, key)
                if rec is not None and rec.expires_at < now:
                    session.delete(rec)
                    session.flush()
                    rec = None
                if rec is None:
                    session.add(IdempotencyRecord(
                        user_id=user_id, key=key, request_hash=digest, owner=owner, lease_until=lease_until,
                        expires_at=now + timedelta(hours=ttl_hours)))
                    return Claim(user_id, key, owner)
                if rec.request_hash != digest:
                    raise InvalidRequest("This Idempotency-Key was used with a different request body.",
                                         code="idempotency_conflict")
                if rec.state == "done" and rec.response_status is not None:
                    return _replay(rec.response_status, rec.response_body or {})
                held_until = rec.lease_until or rec.created_at + timedelta(seconds=lease_seconds)
                if held_until > now:
                    wait = max(1, math.ceil((held_until - now).total_seconds()))
                    raise Conflict("A request with this Idempotency-Key is still being processed.",
                                   code="idempotency_in_progress", retry_after=wait)
                # the holder's lease ran out: take the claim over, unless someone else just did
                taken = session.execute(
                    sa.update(_TABLE).where(_TABLE.c.id == rec.id, _TABLE.c.state == "in_progress",
                                            _owner_is(rec.owner))
                    .values(owner=owner, lease_until=lease_until))
                if not taken.rowcount:  # type: ignore[attr-defined]
                    continue
                job_id = rec.job_id
        except IntegrityError:
            continue  # a concurrent request inserted the key first: read its record
        claim = Claim(user_id, key, owner)
        if job_id is None:
            return claim
        # the dead holder wrote its job: answer it (the reconciler settles whether it
        # reached the cluster), never submit a second one
        result = job_service.answer_for(engine, job_id=job_id)
        answer = Answer(result.status, result.body, replayed=True)
        finish(engine, claim, status=answer.status, body=answer.body)
        return answer
    raise Conflict("The idempotency key is being processed.", code="idempotency_in_progress", retry_after=1)


def _load(session: Session, user_id: int, key: str) -> IdempotencyRecord | None:
    return session.exec(select(IdempotencyRecord).where(
        IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key)).first()


def _owner_is(owner: str | None) -> sa.ColumnElement[bool]:
    return _TABLE.c.owner.is_(None) if owner is None else _TABLE.c.owner == owner


def _replay(status: int, body: dict[str, Any]) -> Answer:
    if status < 400:
        return Answer(status, body, replayed=True)
    stored = {k: v for k, v in body.items() if k not in {"type", "status", "code", "title", "detail"}}
    raise Replayed(status=status, code=str(body.get("code", "error")), title=str(body.get("title", "Error")),
                   detail=str(body.get("detail", "")), **stored)


def _error_record(exc: BrokerError) -> dict[str, Any]:
    """What is kept of an error answer to replay it (turned into HTTP by the API layer)."""
    return {"code": exc.code, "title": exc.title, "detail": exc.detail, **exc.extra}


def link_job(session: Session, claim: Claim, job_id: str) -> None:
    """Record ``job_id`` as the key's job, in the transaction that writes the job row.

    Raises 409 (and so writes no job) if the claim was taken over meanwhile."""
    linked = session.execute(
        sa.update(_TABLE).where(_TABLE.c.user_id == claim.user_id, _TABLE.c.key == claim.key,
                                _TABLE.c.owner == claim.owner, _TABLE.c.state == "in_progress",
                                _TABLE.c.job_id.is_(None))
        .values(job_id=job_id))
    if not linked.rowcount:  # type: ignore[attr-defined]
        raise Conflict("This request's Idempotency-Key claim was taken over by a retry.",
                       code="idempotency_in_progress", retry_after=1)


def finish(engine: Engine, claim: Claim, *, status: int, body: dict[str, Any]) -> None:
    """Store the answer to replay (only while this request still holds the claim)."""
    with session_scope(engine) as session:
        _store(session, claim, status=status, body=body)


def _store(session: Session, claim: Claim, *, status: int, body: dict[str, Any]) -> None:
    """:func:`finish` inside the caller's transaction."""
    session.execute(sa.update(_TABLE).where(_TABLE.c.user_id == claim.user_id, _TABLE.c.key == claim.key,
                                            _TABLE.c.owner == claim.owner)
                    .values(state="done", response_status=status, response_body=body))


def release(engine: Engine, claim: Claim) -> None:
    """The request failed without an answer worth keeping: let a retry proceed.

    If the claim already created a job that may reach (or has reached) the cluster,
    the key keeps answering that job instead, so a retry never makes a second one."""
    with session_scope(engine) as session:
        rec = _load(session, claim.user_id, claim.key)
        if rec is None or rec.owner != claim.owner or rec.state != "in_progress":
            return
        job = session.get(Job, rec.job_id) if rec.job_id else None
        if job is None or job.state == JobState.SUBMIT_FAILED.value:
            session.delete(rec)
            return
    result = job_service.answer_for(engine, job_id=job.id)
    finish(engine, claim, status=result.status, body=result.body)


def purge_expired(engine: Engine) -> int:
    with session_scope(engine) as session:
        result = session.execute(sa.delete(_TABLE).where(_TABLE.c.expires_at < utcnow()))
        return int(result.rowcount)  # type: ignore[attr-defined]
