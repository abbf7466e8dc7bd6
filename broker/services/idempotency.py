"""``Idempotency-Key`` handling for job submission (**contract**).

Same key + same body → the first response replayed (kept ``idempotency_ttl_hours``);
same key + another body → 422 ``idempotency_conflict``; same key while the first
request is still being processed → 409 ``idempotency_in_progress``. Keys are per user.
The record is inserted *before* any work (unique on user+key), so of N concurrent
requests exactly one proceeds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from broker.db import session_scope
from broker.errors import Conflict, InvalidRequest
from broker.models import IdempotencyRecord, utcnow

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Replay:
    status: int
    body: dict[str, Any]


def request_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def validate_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest("Idempotency-Key must be 1-255 printable characters.")


def begin(engine: Engine, *, user_id: int, key: str, digest: str, ttl_hours: int) -> Replay | None:
    """Claim ``key`` for this request, or return the stored response to replay."""
    for _attempt in range(3):
        try:
            with session_scope(engine) as session:
                rec = session.exec(select(IdempotencyRecord).where(
                    IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key)).first()
                now = utcnow()
                if rec is not None and rec.expires_at < now:
                    session.delete(rec)
                    session.flush()
                    rec = None
                if rec is None:
                    session.add(IdempotencyRecord(user_id=user_id, key=key, request_hash=digest,
                                                  expires_at=now + timedelta(hours=ttl_hours)))
                    return None
                return _verdict(rec, digest)
        except IntegrityError:
            continue  # a concurrent request inserted the key first: read its record
    raise Conflict("The idempotency key is being processed.", code="idempotency_in_progress")


def _verdict(rec: IdempotencyRecord, digest: str) -> Replay:
    if rec.request_hash != digest:
        raise InvalidRequest("This Idempotency-Key was used with a different request body.",
                             code="idempotency_conflict")
    if rec.state != "done" or rec.response_status is None:
        raise Conflict("A request with this Idempotency-Key is still being processed.",
                       code="idempotency_in_progress")
    return Replay(rec.response_status, rec.response_body or {})


def finish(engine: Engine, *, user_id: int, key: str, status: int, body: dict[str, Any]) -> None:
    """Store the response to replay."""
    with session_scope(engine) as session:
        table = IdempotencyRecord.__table__  # type: ignore[attr-defined]
        session.execute(sa.update(table).where(table.c.user_id == user_id, table.c.key == key)
                        .values(state="done", response_status=status, response_body=body))


def abandon(engine: Engine, *, user_id: int, key: str) -> None:
    """Forget a claim whose request failed unexpectedly, so a retry can proceed."""
    with session_scope(engine) as session:
        table = IdempotencyRecord.__table__  # type: ignore[attr-defined]
        session.execute(sa.delete(table).where(table.c.user_id == user_id, table.c.key == key,
                                               table.c.state == "in_progress"))


def purge_expired(engine: Engine) -> int:
    with session_scope(engine) as session:
        table = IdempotencyRecord.__table__  # type: ignore[attr-defined]
        result = session.execute(sa.delete(table).where(table.c.expires_at < utcnow()))
        return int(result.rowcount)  # type: ignore[attr-defined]
