"""Threshold notifications and expiry warnings: recording them, planning their webhooks.

This module records (steps 1 and 2 below, in the callers' transactions: the
services and the notifier call it); :mod:`broker.webhooks` is the delivery worker
(step 3) and the only part that talks HTTP. Three steps, each safe with any
number of broker replicas:

1. **Detect** — :func:`record_crossings` inserts one :class:`~broker.models.Notification`
   per threshold of an allocation (``Allocation.thresholds``, default 80/95/100 %
   of the granted amount *charged*) that has been reached and has no row yet. It
   runs in the settlement transaction (hook in ``services.jobs.settle``) and in the
   notifier's periodic scan (which also catches usage imports and grant
   adjustments). :func:`record_expiry_warnings` does the same for "the allocation
   ends in ≤ N days" (``Settings.expiry_warning_days``). The unique constraint
   (allocation, kind, level) makes each crossing exist exactly once; a crossing is
   never re-announced (lowering usage by raising the grant does not re-arm it).
2. **Fan out** — :func:`plan_deliveries` creates one
   :class:`~broker.models.WebhookDelivery` per notification and configured
   endpoint (``Settings.webhooks``), unique per (notification, endpoint).
3. **Deliver** — :func:`deliver_due` claims due deliveries with a conditional
   UPDATE (so one replica sends each attempt), POSTs the JSON body and records
   the outcome; failures are retried with exponential backoff
   (``webhook_backoff_seconds`` × 2^(attempt−1), capped) up to
   ``webhook_max_attempts``, then marked ``failed``.

Webhook request (receivers verify it; :func:`verify_signature` shows how)::

    POST <url>
    Content-Type: application/json
    X-Aifa-Event: allocation.threshold_crossed | allocation.expiring
    X-Aifa-Delivery: <delivery id, stable across retries: deduplicate on it>
    X-Aifa-Timestamp: <unix seconds of this attempt>
    X-Aifa-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>

Delivery is at-least-once on the wire (a receiver that answered 2xx after the
broker died mid-request may see the same delivery id again) and exactly-once per
crossing in the broker's records.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import date
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.auth import Principal
from broker.config import Settings
from broker.models import (
    Allocation,
    Cluster,
    Membership,
    Notification,
    Project,
    WebhookDelivery,
)
from broker.services.common import find_user, to_units, today, visible_project

log = logging.getLogger(__name__)

EVENTS = {"threshold": "allocation.threshold_crossed", "expiry": "allocation.expiring"}
#: set when something new is recorded: wakes the webhook worker (:mod:`broker.webhooks`)
wakeup = threading.Event()


# --- detection ------------------------------------------------------------------------------

def _allocation_view(session: Session, allocation_id: int) -> tuple[Allocation, Project, Cluster] | None:
    row = session.exec(
        select(Allocation, Project, Cluster)
        .join(Project, col(Project.id) == col(Allocation.project_id))
        .join(Cluster, col(Cluster.id) == col(Allocation.cluster_id))
        .where(Allocation.id == allocation_id)
        .execution_options(populate_existing=True)  # balances move by UPDATE statements
    ).first()
    return None if row is None else (row[0], row[1], row[2])


def _payload(alloc: Allocation, project: Project, cluster: Cluster) -> dict[str, Any]:
    remaining = alloc.granted - alloc.charged - alloc.reserved
    end = alloc.end_date or project.end_date
    return {
        "project": project.code, "cluster": cluster.name, "allocation_id": alloc.id, "unit": alloc.unit,
        "account": alloc.account, "granted": to_units(alloc.granted), "used": to_units(alloc.charged),
        "reserved": to_units(alloc.reserved), "remaining": to_units(remaining),
        "percent_used": round(100 * alloc.charged / alloc.granted, 4) if alloc.granted else None,
        "end_date": end.isoformat() if end else None,
    }


def _insert_once(session: Session, note: Notification) -> bool:
    """Insert ``note`` unless its (allocation, kind, level) exists; True if inserted."""
    try:
        with session.begin_nested():
            session.add(note)
            session.flush()
    except IntegrityError:
        return False  # recorded concurrently by another transaction
    return True


def _existing_levels(session: Session, allocation_id: int, kind: str) -> set[float]:
    return set(session.exec(select(Notification.level).where(
        Notification.allocation_id == allocation_id, Notification.kind == kind)).all())


def record_crossings(session: Session, allocation_id: int) -> list[Notification]:
    """Record every threshold of the allocation that is reached and not yet recorded."""
    view = _allocation_view(session, allocation_id)
    if view is None:
        return []
    alloc, project, cluster = view
    if alloc.granted <= 0:
        return []
    percent = 100 * alloc.charged / alloc.granted
    reached = sorted(float(t) for t in alloc.thresholds if percent >= float(t))
    if not reached:
        return []
    missing = [t for t in reached if t not in _existing_levels(session, allocation_id, "threshold")]
    created = []
    for level in missing:
        payload = {**_payload(alloc, project, cluster), "threshold_percent": level}
        note = Notification(
            allocation_id=allocation_id, project_id=project.id or 0, kind="threshold", level=level,
            message=f"{project.code} on {cluster.name} has used {percent:.1f} % of its {alloc.unit} "
                    f"allocation (threshold {level:g} %).", payload=payload)
        if _insert_once(session, note):
            created.append(note)
    if created:
        wakeup.set()
    return created


def on_settled(session: Session, allocation_id: int) -> None:
    """Settlement hook: record threshold crossings in the settling transaction.

    Never lets a notification problem undo a settlement: errors are logged and the
    periodic scan records the crossing later."""
    try:
        with session.begin_nested():
            record_crossings(session, allocation_id)
    except Exception:
        log.exception("threshold check after settling on allocation %s failed; the scan will retry",
                      allocation_id)


def on_charged(session: Session, allocation_ids: Iterable[int]) -> None:
    """:func:`on_settled` for the allocations a batch charged, each only if its charge
    has reached one of its thresholds (one query for all: below the lowest threshold,
    which is the common case, nothing else is read)."""
    ids = sorted(set(allocation_ids))
    if not ids:
        return
    table = Allocation.__table__  # type: ignore[attr-defined]
    rows = session.execute(sa.select(table.c.id, table.c.granted, table.c.charged, table.c.thresholds)
                           .where(table.c.id.in_(ids))).all()
    for alloc_id, granted, charged, thresholds in rows:
        if granted > 0 and any(100 * charged / granted >= float(t) for t in thresholds or ()):
            on_settled(session, alloc_id)


def record_expiry_warnings(session: Session, settings: Settings, *, as_of: date | None = None) -> list[Notification]:
    """Record "ends in ≤ N days" for each allocation and each N of ``expiry_warning_days``."""
    day = as_of or today()
    levels = sorted({int(d) for d in settings.expiry_warning_days if d >= 0})
    if not levels:
        return []
    created = []
    rows = session.exec(
        select(Allocation, Project, Cluster)
        .join(Project, col(Project.id) == col(Allocation.project_id))
        .join(Cluster, col(Cluster.id) == col(Allocation.cluster_id))
        .where(col(Project.status).in_(["active", "pending"]))
    ).all()
    for alloc, project, cluster in rows:
        end = alloc.end_date or project.end_date
        if end is None or end < day:
            continue
        days_left = (end - day).days
        due = [lv for lv in levels if days_left <= lv]
        if not due:
            continue
        have = _existing_levels(session, alloc.id or 0, "expiry")
        # only the tightest level not yet announced: a late start does not send 30 and 7 at once
        fresh = [lv for lv in due if float(lv) not in have]
        if not fresh:
            continue
        for level in fresh:
            announce = level == min(fresh)
            payload = {**_payload(alloc, project, cluster), "days_left": days_left, "warn_days": level}
            note = Notification(
                allocation_id=alloc.id or 0, project_id=project.id or 0, kind="expiry", level=float(level),
                message=f"{project.code} on {cluster.name}: the {alloc.unit} allocation ends on "
                        f"{end.isoformat()} ({days_left} days left).",
                payload={**payload, "superseded": not announce})
            if _insert_once(session, note):
                created.append(note)
    return created


def scan(session: Session, settings: Settings) -> int:
    """Periodic detection over every allocation; returns the number of new notifications."""
    count = 0
    for alloc_id in session.exec(select(Allocation.id).where(Allocation.granted > 0)).all():
        count += len(record_crossings(session, alloc_id or 0))
    count += len(record_expiry_warnings(session, settings))
    return count


# --- fan-out and delivery ----------------------------------------------------------------------

def plan_deliveries(session: Session, settings: Settings) -> int:
    """One delivery row per (notification, endpoint) for notifications not yet planned."""
    created = 0
    for endpoint in settings.webhooks:
        planned = select(WebhookDelivery.notification_id).where(WebhookDelivery.endpoint == endpoint.name)
        notes = session.exec(select(Notification).where(
            col(Notification.kind).in_(endpoint.kinds), col(Notification.id).not_in(planned))
            .order_by(col(Notification.id))).all()
        for note in notes:
            if note.payload.get("superseded"):
                continue
            try:
                with session.begin_nested():
                    session.add(WebhookDelivery(notification_id=note.id or 0, endpoint=endpoint.name,
                                                url=endpoint.url))
                    session.flush()
                created += 1
            except IntegrityError:
                continue
    return created


# --- reading ---------------------------------------------------------------------------------

def list_notifications(session: Session, *, principal: Principal, project: str | None = None,
                       kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Notifications the caller may see (quota managers: all; others: their projects')."""
    ids: list[int] | None = None
    if project is not None:
        p, _ = visible_project(session, principal, project)
        ids = [p.id or 0]
    elif not principal.is_quota_manager:
        user = find_user(session, principal.name)
        ids = [] if user is None else list(session.exec(
            select(Membership.project_id).where(Membership.user_id == user.id)).all())
    return notifications_for(session, project_ids=ids, kind=kind, limit=limit)


def notifications_for(session: Session, *, project_ids: list[int] | None, kind: str | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
    """Newest notifications of ``project_ids`` (None: all) with their webhook deliveries."""
    q = (select(Notification, Project.code, Cluster.name, Allocation.unit)
         .join(Project, col(Project.id) == col(Notification.project_id))
         .join(Allocation, col(Allocation.id) == col(Notification.allocation_id))
         .join(Cluster, col(Cluster.id) == col(Allocation.cluster_id)))
    if project_ids is not None:
        q = q.where(col(Notification.project_id).in_(project_ids))
    if kind:
        q = q.where(Notification.kind == kind)
    rows = session.exec(q.order_by(col(Notification.created_at).desc(), col(Notification.id).desc())
                        .limit(limit)).all()
    ids = [n.id for n, *_ in rows]
    deliveries: dict[int, list[dict[str, Any]]] = {}
    if ids:
        for d in session.exec(select(WebhookDelivery).where(col(WebhookDelivery.notification_id).in_(ids))
                              .order_by(col(WebhookDelivery.id))).all():
            deliveries.setdefault(d.notification_id, []).append({
                "endpoint": d.endpoint, "status": d.status, "attempts": d.attempts,
                "last_status_code": d.last_status_code, "last_error": d.last_error,
                "delivered_at": d.delivered_at, "next_attempt_at": d.next_attempt_at if d.status == "pending"
                else None})
    return [{"id": n.id, "kind": n.kind, "level": n.level, "project": code, "cluster": cluster, "unit": unit,
             "allocation_id": n.allocation_id, "message": n.message, "created_at": n.created_at,
             "payload": n.payload, "deliveries": deliveries.get(n.id or 0, [])}
            for n, code, cluster, unit in rows]
