"""Per-job notifications: a job's own webhook, called on the transitions it chose.

Flow (safe with any number of replicas, like the quota webhooks of
:mod:`broker.webhooks`, whose signing and backoff it shares):

1. **Attach** — at submission, ``notify.url`` is checked (:func:`check_url`: http(s),
   no credentials in it, a host on ``job_webhook_hosts``, and — unless
   ``job_webhook_allow_private_networks`` — every address it resolves to public) and
   stored with the submitter's secret in the job's transaction.
2. **Plan** — :func:`plan` turns the job's committed events (``job_events``) whose
   state is wanted into one :class:`~broker.models.JobWebhookDelivery` each (unique
   per webhook × event); a webhook is retired after its job's terminal event.
3. **Deliver** — :func:`deliver_due` claims a due delivery by a conditional UPDATE,
   re-checks the address (DNS may have changed since submission), POSTs and records
   the outcome; failures are retried with exponential backoff up to
   ``webhook_max_attempts``.

Request (the receiver verifies it with :func:`broker.webhooks.verify_signature`)::

    POST <notify.url>
    X-Aifa-Event: job.state_changed
    X-Aifa-Delivery: <delivery id, stable across retries>
    X-Aifa-Timestamp: <unix seconds>
    X-Aifa-Signature: sha256=<hex HMAC-SHA256(notify.secret, "<timestamp>." + raw body)>

    {"event": "job.state_changed", "delivery_id": 7,
     "job": {"id": "...", "state": "COMPLETED", "previous_state": "RUNNING", "event_id": 42,
             "occurred_at": "..."}}
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.config import Settings
from broker.db import session_scope
from broker.errors import InvalidRequest
from broker.models import JobEvent, JobWebhook, JobWebhookDelivery, utcnow
from broker.schemas import JobNotify
from broker.states import TERMINAL_STATES
from broker.webhooks import attempt_delivery, claim, finish

log = logging.getLogger(__name__)

EVENT = "job.state_changed"
TERMINAL = frozenset(s.value for s in TERMINAL_STATES)


class NotifyRefused(InvalidRequest):
    """The ``notify`` URL is not one this site lets the broker call."""

    code, title = "notify_refused", "Notification URL refused"


# --- where the broker may send ---------------------------------------------------------------

def host_allowed(host: str, patterns: list[str]) -> bool:
    """``host`` matches an allow-list entry: exact, ``*.domain`` (sub-domains), ``*`` (any)."""
    host = host.lower().rstrip(".")
    for pattern in (p.lower().rstrip(".") for p in patterns):
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise NotifyRefused(f"The notification host {host} does not resolve.") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def check_url(url: str, settings: Settings) -> str:
    """The URL if the site allows calling it; :class:`NotifyRefused` (422) otherwise."""
    if not settings.job_webhook_hosts:
        raise NotifyRefused("This broker does not send per-job notifications (no job_webhook_hosts configured).")
    parts = urlsplit(url)
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise NotifyRefused("notify.url must be an http(s) URL with a host.")
    if parts.username or parts.password:
        raise NotifyRefused("notify.url must not carry credentials; sign with notify.secret instead.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise NotifyRefused("notify.url has an invalid port.") from exc
    host = parts.hostname
    if not host_allowed(host, settings.job_webhook_hosts):
        raise NotifyRefused(f"Host {host} is not on this site's list of notification hosts.")
    if not settings.job_webhook_allow_private_networks:
        for address in _addresses(host, port):
            if not address.is_global or address.is_multicast:
                raise NotifyRefused(f"Host {host} is a loopback, private or reserved address ({address}); "
                                    "this site does not send notifications there.")
    return url


def attach(session: Session, settings: Settings, *, job_id: str, notify: JobNotify) -> None:
    """Store the job's webhook (in the job's transaction: both exist, or neither)."""
    session.add(JobWebhook(job_id=job_id, url=check_url(notify.url, settings), secret=notify.secret,
                           states=list(notify.on)))


def _wanted(state: str, states: list[str]) -> bool:
    return state in states or ("TERMINAL" in states and state in TERMINAL)


# --- planning ------------------------------------------------------------------------------------

def plan(engine: Engine) -> int:
    """One delivery per new wanted transition of every active webhook (one query)."""
    made = 0
    with session_scope(engine) as session:
        rows = session.exec(
            select(JobEvent, JobWebhook).join(JobWebhook, col(JobWebhook.job_id) == col(JobEvent.job_id))
            .where(col(JobWebhook.active).is_(True), col(JobEvent.id) > col(JobWebhook.planned_event_id))
            .order_by(col(JobEvent.id)).limit(1000)).all()
        for event, hook in rows:
            if event.state != event.previous_state and _wanted(event.state, hook.states):
                try:
                    with session.begin_nested():
                        session.add(JobWebhookDelivery(webhook_id=hook.id or 0, event_id=event.id or 0,
                                                       state=event.state))
                    made += 1
                except IntegrityError:
                    pass  # planned by another replica
            hook.planned_event_id = max(hook.planned_event_id, event.id or 0)
            if event.state in TERMINAL:
                hook.active = False
            session.add(hook)
    return made


# --- delivery ------------------------------------------------------------------------------------

def _body(delivery: JobWebhookDelivery, hook: JobWebhook, event: JobEvent) -> bytes:
    doc = {"event": EVENT, "delivery_id": delivery.id,
           "job": {"id": hook.job_id, "state": event.state, "previous_state": event.previous_state,
                   "event_id": event.id, "occurred_at": event.occurred_at.isoformat()}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def deliver_due(engine: Engine, settings: Settings, http: httpx.Client, *, limit: int = 50) -> int:
    """Send every due delivery; returns how many were delivered now."""
    with session_scope(engine) as session:
        due = list(session.exec(
            select(JobWebhookDelivery, JobWebhook, JobEvent)
            .join(JobWebhook, col(JobWebhook.id) == col(JobWebhookDelivery.webhook_id))
            .join(JobEvent, col(JobEvent.id) == col(JobWebhookDelivery.event_id))
            .where(JobWebhookDelivery.status == "pending", col(JobWebhookDelivery.next_attempt_at) <= utcnow())
            .order_by(col(JobWebhookDelivery.next_attempt_at)).limit(limit)).all())
    delivered = 0
    for delivery, hook, event in due:
        if not claim(engine, delivery):
            continue
        attempt = delivery.attempts + 1
        try:
            check_url(hook.url, settings)  # again: what the name resolves to may have changed
        except NotifyRefused as exc:
            finish(engine, delivery.id or 0, ok=False, attempt=attempt, code=None, settings=settings,
                   error=exc.detail, give_up=True, model=JobWebhookDelivery)
            continue
        delivered += attempt_delivery(
            engine, settings, http, delivery=delivery, attempt=attempt, url=hook.url, secret=hook.secret,
            event=EVENT, body=_body(delivery, hook, event), what=f"job {hook.job_id} webhook")
    return delivered


def status_of(session: Session, job_id: str) -> dict[str, Any] | None:
    """The job's webhook (without its secret) and every delivery's state."""
    hook = session.exec(select(JobWebhook).where(JobWebhook.job_id == job_id)).first()
    if hook is None:
        return None
    rows = session.exec(select(JobWebhookDelivery).where(JobWebhookDelivery.webhook_id == hook.id)
                        .order_by(col(JobWebhookDelivery.event_id))).all()
    return {"url": hook.url, "on": hook.states, "deliveries": [
        {"id": d.id, "event_id": d.event_id, "state": d.state, "status": d.status, "attempts": d.attempts,
         "last_status_code": d.last_status_code, "last_error": d.last_error, "delivered_at": d.delivered_at,
         "next_attempt_at": d.next_attempt_at if d.status == "pending" else None} for d in rows]}


# --- background sender ----------------------------------------------------------------------------

class JobWebhookSender:
    """Background thread (only when ``job_webhook_hosts`` is configured): plan, deliver."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http: httpx.Client | None = None

    def start(self) -> None:
        if not self.settings.job_webhook_hosts:
            return
        self._http = httpx.Client(timeout=self.settings.webhook_timeout_seconds, follow_redirects=False)
        self._thread = threading.Thread(target=self._run, name="aifa-job-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        if self._http is not None:
            self._http.close()

    def run_once(self) -> int:
        plan(self.engine)
        assert self._http is not None
        return deliver_due(self.engine, self.settings, self._http)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the loop must survive any single failure
                log.exception("job webhook pass failed")
            self._stop.wait(self.settings.job_webhook_interval_seconds)
