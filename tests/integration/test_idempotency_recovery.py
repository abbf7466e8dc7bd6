"""Idempotency that recovers (issue 10 point 3): a claim carries an owner and a short
lease; a retry after the lease answers the job the dead holder wrote, or takes the
claim over; never two jobs, never a wedged key. SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from broker.auth import Principal
from broker.errors import Conflict
from broker.schemas import JobRequest
from broker.services import idempotency
from broker.services import jobs as job_service
from tests.support.env import BrokerEnv, broker_env

LEASE = 1.0
ALICE = Principal(name="alice", roles=frozenset())
BODY = {"project": "EHPC-TEST-001", "script": "sleep 0.2", "time_limit_minutes": 5}


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    with broker_env(tmp_path, db_url, idempotency_lease_seconds=LEASE) as e:
        yield e


class _Killed(BaseException):
    """Stands for the process dying: nothing after it runs, no handler records anything."""


def _die(*_: Any, **__: Any) -> None:
    raise _Killed


def _count_jobs(env: BrokerEnv) -> int:
    with env.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar() or 0)


def _key_state(env: BrokerEnv, key: str) -> str:
    with env.engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT state FROM idempotency_records WHERE key = :k"), {"k": key}).scalar())


def _post(env: BrokerEnv, key: str) -> Any:
    return env.call("POST", "/v1/jobs", {**env.auth("alice"), "Idempotency-Key": key}, json=BODY)


def _submit_and_die(env: BrokerEnv, key: str) -> None:
    """The first attempt, run in-process so that the simulated death unwinds through it."""
    with pytest.raises(_Killed):
        idempotency.submit_once(engine=env.engine, settings=env.settings, registry=env.app.state.registry,
                                principal=ALICE, body=JobRequest.model_validate(BODY), key=key)


def test_crash_between_claim_and_finish_retry_gets_the_job(env: BrokerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    env.setup_project()
    # the broker dies right after the job reached the cluster, before it stored the answer
    # (stored with the scheduler's id, in one transaction: dying there loses both)
    monkeypatch.setattr(idempotency, "_store", _die)
    monkeypatch.setattr(idempotency, "_quietly", lambda *a, **k: None)
    _submit_and_die(env, "crash-after-submit")
    monkeypatch.undo()
    assert _count_jobs(env) == 1 and _key_state(env, "crash-after-submit") == "in_progress"
    # within the lease: still in progress, with a hint when to retry
    early = _post(env, "crash-after-submit")
    assert early.status_code == 409 and early.json()["code"] == "idempotency_in_progress"
    assert early.headers["content-type"] == "application/problem+json" and int(early.headers["retry-after"]) >= 1
    with env.engine.connect() as conn:
        job_id = str(conn.execute(sa.text("SELECT id FROM jobs")).scalar())
    # the tracker's reconciler finds the job on the cluster by its tag and records its id
    env.wait_job(job_id, env.auth("alice"), lambda j: j["scheduler_job_id"] is not None)
    time.sleep(LEASE + 0.2)
    retry = _post(env, "crash-after-submit")
    assert retry.status_code == 201, retry.text
    assert retry.headers.get("idempotent-replayed") == "true"
    assert retry.json()["scheduler_job_id"] is not None
    assert _count_jobs(env) == 1 and _key_state(env, "crash-after-submit") == "done"
    again = _post(env, "crash-after-submit")
    assert (again.status_code, again.json()["id"]) == (201, retry.json()["id"])
    env.wait_settled(retry.json()["id"], env.auth("alice"))


def test_crash_before_the_scheduler_call_retry_answers_the_written_job(
        env: BrokerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    env.setup_project()
    # the job row (the intent) is committed, then the broker dies before the adapter call
    monkeypatch.setattr(job_service, "adapter_for", _die)
    monkeypatch.setattr(idempotency, "_quietly", lambda *a, **k: None)
    _submit_and_die(env, "crash-before-submit")
    monkeypatch.undo()
    time.sleep(LEASE + 0.2)
    retry = _post(env, "crash-before-submit")
    # the job exists but the scheduler may or may not have it: 202, reconciled by the tracker
    assert retry.status_code == 202, retry.text
    job = retry.json()
    assert _count_jobs(env) == 1
    settled = env.wait_settled(job["id"], env.qm, timeout=30)
    assert settled["state"] == "SUBMIT_FAILED" and settled["charged"]["amount"] == 0
    replay = _post(env, "crash-before-submit")
    assert (replay.status_code, replay.json()["id"]) == (202, job["id"])


def test_crash_before_the_job_row_retry_takes_the_claim_over(
        env: BrokerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    env.setup_project()
    monkeypatch.setattr(job_service, "_reserve_answer", _die)
    monkeypatch.setattr(idempotency, "_quietly", lambda *a, **k: None)
    _submit_and_die(env, "crash-before-row")
    monkeypatch.undo()
    assert _count_jobs(env) == 0
    time.sleep(LEASE + 0.2)
    retry = _post(env, "crash-before-row")
    assert retry.status_code == 201, retry.text
    assert "idempotent-replayed" not in retry.headers  # a real first submission
    assert _count_jobs(env) == 1
    env.wait_settled(retry.json()["id"], env.auth("alice"))


def test_a_dethroned_holder_cannot_write_a_second_job(env: BrokerEnv) -> None:
    env.setup_project()
    with env.engine.connect() as conn:
        user_id = conn.execute(sa.text("SELECT id FROM users WHERE name = 'alice'")).scalar()
    args = dict(user_id=user_id, key="slow-holder", digest="d" * 64, ttl_hours=1, lease_seconds=LEASE)
    slow = idempotency.begin(env.engine, **args)
    assert isinstance(slow, idempotency.Claim)
    time.sleep(LEASE + 0.2)
    fast = idempotency.begin(env.engine, **args)
    assert isinstance(fast, idempotency.Claim) and fast.owner != slow.owner
    principal, request = ALICE, JobRequest.model_validate(BODY)
    with pytest.raises(Conflict) as lost:
        job_service.submit(engine=env.engine, settings=env.settings, registry=env.app.state.registry,
                           principal=principal, body=request,
                           link=lambda s, job_id: idempotency.link_job(s, slow, job_id))
    assert lost.value.code == "idempotency_in_progress"
    assert _count_jobs(env) == 0
    won = job_service.submit(engine=env.engine, settings=env.settings, registry=env.app.state.registry,
                             principal=principal, body=request,
                             link=lambda s, job_id: idempotency.link_job(s, fast, job_id))
    assert won.status == 201 and _count_jobs(env) == 1
    env.wait_settled(won.job.id, env.auth("alice"))


def test_replayed_error_keeps_problem_json(env: BrokerEnv) -> None:
    env.setup_project(amount=0.01)
    body = {**BODY, "time_limit_minutes": 600}
    head = {**env.auth("alice"), "Idempotency-Key": "denied"}
    first = env.call("POST", "/v1/jobs", head, json=body)
    second = env.call("POST", "/v1/jobs", head, json=body)
    assert first.status_code == second.status_code == 409
    assert first.json() == second.json() and second.json()["code"] == "quota_exceeded"
    assert second.headers["content-type"] == first.headers["content-type"] == "application/problem+json"
    assert second.headers.get("idempotent-replayed") == "true"


def test_the_answer_is_stored_with_the_scheduler_id(env: BrokerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed submission commits its answer in the transaction that records the
    scheduler's id: no separate step (``finish``) is left to fail after the job ran."""
    env.setup_project()
    monkeypatch.setattr(idempotency, "finish", _die)
    first = _post(env, "one-commit")
    assert first.status_code == 201, first.text
    monkeypatch.undo()
    assert _key_state(env, "one-commit") == "done"
    again = _post(env, "one-commit")
    assert again.status_code == 201 and again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()
    env.wait_settled(first.json()["id"], env.auth("alice"))
