"""Threshold notifications and expiry warnings as HMAC-signed webhooks, delivered
once per crossing to a real HTTP receiver on 127.0.0.1, retried on failure
(SQLite and PostgreSQL)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.adapter import JobStatus
from broker.db import session_scope
from broker.models import Allocation, Job
from broker.services import ledger
from broker.services.common import get_or_create_user, today
from broker.services.jobs import settle
from broker.states import JobState
from broker.webhooks import sign, verify_signature
from tests.support.env import BrokerEnv, broker_env
from tests.support.webhooks import Receiver, webhook_receiver

SECRET = "test-webhook-secret-0123456789"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


def _env(tmp_path: Path, db_url: str, receiver: Receiver, **overrides: Any) -> Any:
    values: dict[str, Any] = dict(
        webhooks=[{"name": "ops", "url": receiver.url, "secret": SECRET}],
        webhook_backoff_seconds=0.05, webhook_max_attempts=4, notification_interval_seconds=0.1,
        webhook_timeout_seconds=5.0,
    )
    values.update(overrides)
    return broker_env(tmp_path, db_url, **values)


def _settle_usage(env: BrokerEnv, alloc_id: int, cores: int, user: str = "alice") -> None:
    """A job that used ``cores`` core-hours, settled through the real settlement path."""
    with session_scope(env.engine) as s:
        alloc = s.get(Allocation, alloc_id)
        assert alloc is not None
        u = get_or_create_user(s, user)
        amount = cores * 1_000_000
        job = Job(id=uuid.uuid4().hex, project_id=alloc.project_id, cluster_id=alloc.cluster_id, user_id=u.id or 0,
                  allocation_id=alloc_id, name="t", partition="cpu", username=user, account=alloc.account,
                  unit=alloc.unit, estimated=amount, reserved=amount, state="RUNNING")
        s.add(job)
        s.flush()
        ledger.reserve(s, allocation=alloc, amount=amount, job_id=job.id, user_id=u.id, actor=user)
        status = JobStatus(job_id="1", state=JobState.COMPLETED, raw_state="COMPLETED", final=True,
                           exit_code=0, elapsed_seconds=3600, alloc_tres={"cpu": cores})
        assert settle(s, job=job, status=status, cost_model={})


def _wait(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def _drive(env: BrokerEnv, until: Callable[[], bool], timeout: float = 20.0) -> None:
    """Run notifier passes until ``until()`` holds (the background thread is off)."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        env.app.state.notifier.run_once()
        time.sleep(0.05)


def _check_signature(req: Any) -> None:
    assert req.headers["x-aifa-signature"] == sign(SECRET, int(req.headers["x-aifa-timestamp"]), req.body)
    assert verify_signature(SECRET, req.headers["x-aifa-timestamp"], req.body, req.headers["x-aifa-signature"])
    assert not verify_signature("another-secret-000000", req.headers["x-aifa-timestamp"], req.body,
                                req.headers["x-aifa-signature"])


def test_each_threshold_crossing_is_delivered_once_signed_and_retried(
    db_url: str, tmp_path: Path, receiver: Receiver,
) -> None:
    receiver.script = [500, 503]  # the first delivery fails twice, then succeeds
    with _env(tmp_path, db_url, receiver, run_tracker=False) as env:
        alloc = env.setup_project(amount=10.0, unit="core_hours", members=("alice",))
        _settle_usage(env, alloc["id"], 5)  # 50 %: below every threshold
        env.app.state.notifier.run_once()
        assert receiver.requests == []
        _settle_usage(env, alloc["id"], 3)  # 80 %: crosses 80
        _drive(env, lambda: len(receiver.delivered()) == 1)
        assert [r.status for r in receiver.requests] == [500, 503, 200]
        ids = {r.headers["x-aifa-delivery"] for r in receiver.requests}
        assert len(ids) == 1, "retries keep the delivery id (receivers deduplicate on it)"
        _settle_usage(env, alloc["id"], 2)  # 100 %: crosses 95 and 100 at once
        _drive(env, lambda: len(receiver.delivered()) == 3)
        for _ in range(5):  # more passes, a re-scan, nothing new
            env.app.state.notifier.run_once()
        delivered = receiver.delivered()
        assert len(delivered) == 3
        levels = sorted(r.json["notification"]["level"] for r in delivered)
        assert levels == [80.0, 95.0, 100.0]
        for req in receiver.requests:
            _check_signature(req)
            assert req.headers["x-aifa-event"] == "allocation.threshold_crossed"
            assert req.headers["content-type"] == "application/json"
        first = next(r.json for r in delivered if r.json["notification"]["level"] == 80.0)
        assert first["notification"]["project"] == "EHPC-TEST-001"
        assert first["notification"]["percent_used"] == 80.0
        assert first["notification"]["used"] == 8.0 and first["notification"]["granted"] == 10.0

        notes = env.call("GET", "/v1/notifications", env.qm).json()["notifications"]
        assert sorted(n["level"] for n in notes) == [80.0, 95.0, 100.0]
        by_level = {n["level"]: n for n in notes}
        assert by_level[80.0]["deliveries"][0]["status"] == "delivered"
        assert by_level[80.0]["deliveries"][0]["attempts"] == 3
        assert all(n["deliveries"][0]["attempts"] == 1 for n in notes if n["level"] != 80.0)
        # members see their project's notifications; others see none and get 404 on the project
        assert len(env.call("GET", "/v1/projects/EHPC-TEST-001/notifications", env.auth("alice")).json()
                   ["notifications"]) == 3
        assert env.call("GET", "/v1/notifications", env.auth("mallory")).json()["notifications"] == []
        assert env.call("GET", "/v1/projects/EHPC-TEST-001/notifications",
                        env.auth("mallory")).status_code == 404
        # the secret never appears in what the API shows
        assert SECRET not in env.call("GET", "/v1/notifications", env.qm).text


def test_a_real_job_crossing_a_threshold_sends_one_webhook(db_url: str, tmp_path: Path, receiver: Receiver) -> None:
    """Tracker → settlement hook → notifier thread → receiver, all live."""
    with _env(tmp_path, db_url, receiver) as env:
        env.setup_project(amount=10.0, unit="core_hours")
        r = env.call("PATCH", "/v1/projects/EHPC-TEST-001/allocations/1", env.qm,
                     json={"thresholds": [0.001, 99.0]})
        assert r.status_code == 200, r.text
        alice = env.auth("alice")
        job = env.call("POST", "/v1/jobs", alice, json={
            "project": "EHPC-TEST-001", "script": "#!/bin/sh\nsleep 1\n", "time_limit_minutes": 5}).json()
        env.wait_settled(job["id"], alice)
        _wait(lambda: len(receiver.delivered()) == 1)
        time.sleep(0.5)
        assert len(receiver.requests) == 1
        body = receiver.requests[0].json
        assert body["notification"]["level"] == 0.001 and body["event"] == "allocation.threshold_crossed"
        _check_signature(receiver.requests[0])


def test_expiry_warning_once_and_delivery_gives_up_after_max_attempts(
    db_url: str, tmp_path: Path, receiver: Receiver,
) -> None:
    receiver.script = [500] * 10
    with _env(tmp_path, db_url, receiver, run_tracker=False, webhook_max_attempts=3,
              expiry_warning_days=[30, 7]) as env:
        env.setup_project(amount=10.0)
        end = (today() + timedelta(days=5)).isoformat()
        assert env.call("PATCH", "/v1/projects/EHPC-TEST-001/allocations/1", env.qm,
                        json={"end_date": end}).status_code == 200

        def failed() -> bool:
            notes = env.call("GET", "/v1/notifications", env.qm, params={"kind": "expiry"}).json()["notifications"]
            return any(d["status"] == "failed" for n in notes for d in n["deliveries"])

        _drive(env, failed)
        for _ in range(3):
            env.app.state.notifier.run_once()
        assert len(receiver.requests) == 3, "three attempts, then it gives up"
        assert {r.headers["x-aifa-event"] for r in receiver.requests} == {"allocation.expiring"}
        assert {r.json["notification"]["warn_days"] for r in receiver.requests} == {7}
        notes = env.call("GET", "/v1/notifications", env.qm, params={"kind": "expiry"}).json()["notifications"]
        assert sorted(n["level"] for n in notes) == [7.0, 30.0]  # 30 recorded, superseded by 7: not sent
        sent = next(n for n in notes if n["level"] == 7.0)
        assert sent["deliveries"][0]["attempts"] == 3 and sent["deliveries"][0]["last_status_code"] == 500
        assert next(n for n in notes if n["level"] == 30.0)["deliveries"] == []


def test_signature_verification_rejects_tampering_and_old_timestamps() -> None:
    body = b'{"a":1}'
    ts = int(time.time())
    sig = sign(SECRET, ts, body)
    assert verify_signature(SECRET, str(ts), body, sig)
    assert not verify_signature(SECRET, str(ts), b'{"a":2}', sig)
    assert not verify_signature(SECRET, str(ts - 3600), body, sign(SECRET, ts - 3600, body))
    assert not verify_signature(SECRET, "not-a-number", body, sig)
