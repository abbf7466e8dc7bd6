"""Webhook delivery worker: signs and POSTs recorded notifications, with retries.

The notifications and their planned deliveries are recorded by
:mod:`broker.services.notifications` (see there for the whole flow and the
webhook request format); this module only sends them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from datetime import timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from broker.config import Settings, WebhookEndpoint
from broker.db import session_scope
from broker.models import Notification, WebhookDelivery, utcnow
from broker.services.notifications import EVENTS, plan_deliveries, scan, wakeup

log = logging.getLogger(__name__)

#: how long a claimed attempt is reserved for the replica sending it
CLAIM_SECONDS = 120.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Aifa-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, timestamp: str, body: bytes, signature: str, *,
                     tolerance_seconds: int = 300, now: float | None = None) -> bool:
    """What a receiver does: recompute the HMAC and check the timestamp is recent."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def _body(note: Notification, delivery: WebhookDelivery) -> bytes:
    doc = {"event": EVENTS.get(note.kind, note.kind), "delivery_id": delivery.id,
           "notification": {"id": note.id, "kind": note.kind, "level": note.level, "message": note.message,
                            "created_at": note.created_at.isoformat(), **note.payload}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """Delay before the next attempt after ``attempts`` failed ones."""
    return float(min(settings.webhook_backoff_max_seconds,
                     settings.webhook_backoff_seconds * 2 ** max(0, attempts - 1)))


def claim(engine: Engine, delivery: Any) -> bool:
    """Take the next attempt of ``delivery`` (a quota or a job webhook delivery row)
    for this replica: a conditional UPDATE on its attempt count."""
    table = type(delivery).__table__
    now = utcnow()
    with session_scope(engine) as session:
        result = session.execute(
            sa.update(table).where(table.c.id == delivery.id, table.c.status == "pending",
                                   table.c.attempts == delivery.attempts)
            .values(attempts=delivery.attempts + 1, next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def deliver_due(engine: Engine, settings: Settings, http: httpx.Client, *, limit: int = 50) -> int:
    """Send every delivery that is due; returns how many were delivered now."""
    endpoints: dict[str, WebhookEndpoint] = {e.name: e for e in settings.webhooks}
    with session_scope(engine) as session:
        due = list(session.exec(
            select(WebhookDelivery, Notification)
            .join(Notification, col(Notification.id) == col(WebhookDelivery.notification_id))
            .where(WebhookDelivery.status == "pending", col(WebhookDelivery.next_attempt_at) <= utcnow())
            .order_by(col(WebhookDelivery.next_attempt_at)).limit(limit)).all())
    delivered = 0
    for delivery, note in due:
        if not claim(engine, delivery):
            continue
        attempt = delivery.attempts + 1
        endpoint = endpoints.get(delivery.endpoint)
        if endpoint is None:
            finish(engine, delivery.id or 0, ok=False, attempt=attempt, code=None, settings=settings,
                    error="endpoint no longer configured", give_up=True)
            continue
        body = _body(note, delivery)
        delivered += attempt_delivery(
            engine, settings, http, delivery=delivery, attempt=attempt, url=endpoint.url, secret=endpoint.secret,
            event=EVENTS.get(note.kind, note.kind), body=body, what=f"webhook {endpoint.name}")
    return delivered


def attempt_delivery(engine: Engine, settings: Settings, http: httpx.Client, *, delivery: Any, attempt: int,
                     url: str, secret: str, event: str, body: bytes, what: str) -> bool:
    """POST one signed attempt of ``delivery`` (claimed) and record its outcome (see
    :func:`finish`); True when the receiver took it (2xx)."""
    ts = int(time.time())
    headers = {"Content-Type": "application/json", "User-Agent": "aifa-broker-webhook/1",
               "X-Aifa-Event": event, "X-Aifa-Delivery": str(delivery.id),
               "X-Aifa-Timestamp": str(ts), "X-Aifa-Signature": sign(secret, ts, body)}
    code: int | None = None
    error: str | None = None
    try:
        response = http.post(url, content=body, headers=headers)
        code = response.status_code
        if not 200 <= code < 300:
            error = f"HTTP {code}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    if error is not None:
        log.warning("%s delivery %s attempt %d failed: %s", what, delivery.id, attempt, error)
    finish(engine, delivery.id or 0, ok=error is None, attempt=attempt, code=code, settings=settings, error=error,
           give_up=attempt >= settings.webhook_max_attempts, model=type(delivery))
    return error is None


def finish(engine: Engine, delivery_id: int, *, ok: bool, attempt: int, code: int | None,
           settings: Settings, error: str | None, give_up: bool, model: Any = WebhookDelivery) -> None:
    """Record an attempt's outcome: delivered, given up, or due again after the backoff."""
    with session_scope(engine) as session:
        row = session.get(model, delivery_id)
        if row is None:
            return
        now = utcnow()
        row.last_status_code, row.last_error = code, None if ok else (error or "failed")[:2000]
        if ok:
            row.status, row.delivered_at = "delivered", now
        elif give_up:
            row.status = "failed"
        else:
            row.next_attempt_at = now + timedelta(seconds=backoff_seconds(settings, attempt))
        session.add(row)


# --- background worker -----------------------------------------------------------------------

class Notifier:
    """Background thread: scan for crossings/expiry, plan and deliver webhooks."""

    def __init__(self, engine: Engine, settings: Settings, http: httpx.Client | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self._http = http
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="aifa-notifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        wakeup.set()
        if self._thread:
            self._thread.join(timeout)
        if self._http is not None:
            self._http.close()
            self._http = None

    @property
    def http(self) -> httpx.Client:
        """The HTTP client for webhooks (created on first use)."""
        if self._http is None:
            self._http = httpx.Client(timeout=self.settings.webhook_timeout_seconds, follow_redirects=False)
        return self._http

    def run_once(self) -> int:
        """One pass; returns the number of webhooks delivered."""
        with session_scope(self.engine) as session:
            scan(session, self.settings)
            plan_deliveries(session, self.settings)
        if not self.settings.webhooks:
            return 0
        return deliver_due(self.engine, self.settings, self.http)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the loop must survive any single failure
                log.exception("notifier pass failed")
            wakeup.wait(self.settings.notification_interval_seconds)
            wakeup.clear()

