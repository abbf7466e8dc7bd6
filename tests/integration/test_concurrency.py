"""Budgets are never overspent by concurrency; idempotency holds under concurrency.

Runs over real HTTP (uvicorn on loopback) against SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from broker.db import session_scope
from broker.services import ledger
from tests.support.env import BrokerEnv, broker_env
from tests.support.server import live_server

K = 7
N = 200


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    """A broker that admits the whole burst: these tests are about the budget and the
    idempotency key under concurrency, not about shedding load (503 ``overloaded`` is
    tested in the load tests)."""
    with broker_env(tmp_path, db_url, max_requests_in_flight=4 * N) as e:
        yield e


def _post_all(base: str, headers_list: list[dict[str, str]], body: dict) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx.Client(base_url=base, timeout=120, limits=limits) as client:
        with ThreadPoolExecutor(max_workers=48) as pool:
            return list(pool.map(lambda h: client.post("/v1/jobs", json=body, headers=h), headers_list))


def test_200_concurrent_submissions_accept_exactly_k(env: BrokerEnv) -> None:
    # each job estimates 1 core-hour (1 cpu × 60 min); the allocation fits exactly K.
    # The jobs sleep so that no settlement frees budget during the burst.
    env.setup_project(amount=float(K), members=("alice", "bob"))
    body = {"project": "EHPC-TEST-001", "script": "sleep 60", "time_limit_minutes": 60}
    heads = [env.auth("alice") if i % 2 else env.auth("bob") for i in range(N)]
    with live_server(env.app) as base:
        responses = _post_all(base, heads, body)
    codes = Counter((r.status_code, r.json().get("code")) for r in responses)
    assert codes[(201, None)] == K, codes
    assert codes[(409, "quota_exceeded")] == N - K, codes
    with env.engine.connect() as conn:
        granted, charged, reserved = conn.execute(sa.text("SELECT granted, charged, reserved FROM allocations")).one()
        jobs = conn.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar()
    assert granted - charged - reserved >= 0
    assert jobs == K
    accepted = [r.json() for r in responses if r.status_code == 201]
    for job in accepted:
        owner = env.auth(job["user"])
        env.wait_job(job["id"], owner, lambda j: j["scheduler_job_id"] is not None)
        assert env.call("DELETE", f"/v1/jobs/{job['id']}", owner).status_code == 202
    for job in accepted:
        assert env.wait_settled(job["id"], env.qm)["state"] == "CANCELLED"
    with session_scope(env.engine) as s:
        assert ledger.check(s) == []


def test_50_concurrent_requests_with_one_key_make_one_job(env: BrokerEnv) -> None:
    env.setup_project(amount=1000.0)
    body = {"project": "EHPC-TEST-001", "script": "sleep 1", "time_limit_minutes": 5}
    head = {**env.auth("alice"), "Idempotency-Key": "retry-me-1"}
    with live_server(env.app) as base:
        responses = _post_all(base, [head] * 50, body)
        statuses = Counter(r.status_code for r in responses)
        # every answer is either the job (first or a replay) or "still in progress"
        assert set(statuses) <= {201, 409}, statuses
        assert all(r.json()["code"] == "idempotency_in_progress" for r in responses if r.status_code == 409)
        job_ids = {r.json()["id"] for r in responses if r.status_code == 201}
        assert len(job_ids) == 1
        # afterwards the same key + body replays the first response
        with httpx.Client(base_url=base) as c:
            again = c.post("/v1/jobs", json=body, headers=head)
            assert again.status_code == 201 and again.json()["id"] in job_ids
            assert again.headers.get("idempotent-replayed") == "true"
            other = c.post("/v1/jobs", json={**body, "script": "sleep 2"}, headers=head)
            assert (other.status_code, other.json()["code"]) == (422, "idempotency_conflict")
            # keys are per user: bob may use the same key for his own job
            env.setup_project("EHPC-TEST-002", members=("bob",), account="proj-b")
            bob = c.post("/v1/jobs", json={**body, "project": "EHPC-TEST-002"},
                         headers={**env.auth("bob"), "Idempotency-Key": "retry-me-1"})
            assert bob.status_code == 201 and bob.json()["id"] not in job_ids
    with env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar() == 2


def test_idempotent_replay_of_a_denial(env: BrokerEnv) -> None:
    env.setup_project(amount=0.01)
    body = {"project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 60}
    head = {**env.auth("alice"), "Idempotency-Key": "k2"}
    first = env.call("POST", "/v1/jobs", head, json=body)
    second = env.call("POST", "/v1/jobs", head, json=body)
    assert first.status_code == second.status_code == 409
    assert first.json() == second.json()
