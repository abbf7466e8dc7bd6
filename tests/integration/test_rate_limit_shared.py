"""The per-user rate limit holds across replicas when its window lives in Redis.

Two broker apps (two "replicas": separate apps, limiters and connection pools) on one
database and the machine's Redis (127.0.0.1:6379, as in CI)."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.metrics import RATE_LIMIT_STORE_ERRORS
from broker.ratelimit import RateLimiter, SharedRateLimiter, make_rate_limiter
from tests.support.env import BrokerEnv, broker_env
from tests.support.redis import require_redis


@pytest.fixture
def redis_url() -> str:
    return require_redis()


@contextlib.contextmanager
def two_replicas(tmp_path: Path, db_url: str, **settings: object) -> Iterator[tuple[BrokerEnv, BrokerEnv]]:
    # one data directory: both replicas verify tokens of the same (shared) signing key
    with broker_env(tmp_path, db_url, run_tracker=False, **settings) as a, \
            broker_env(tmp_path, db_url, run_tracker=False, **settings) as b:
        yield a, b


def _submit(env: BrokerEnv, user: str, token_env: BrokerEnv) -> int:
    return int(env.call("POST", "/v1/jobs", token_env.auth(user), json={
        "project": "EHPC-TEST-001", "script": "#!/bin/sh\ntrue\n", "time_limit_minutes": 5}).status_code)


def test_two_replicas_share_one_window(db_url: str, tmp_path: Path, redis_url: str) -> None:
    user = f"rl-{uuid.uuid4().hex[:10]}"  # a fresh window in the shared store
    with two_replicas(tmp_path, db_url, rate_limit_per_minute=3, rate_limit_storage_url=redis_url) as (a, b):
        assert isinstance(a.app.state.rate_limiter, SharedRateLimiter)
        assert a.app.state.rate_limiter is not b.app.state.rate_limiter
        a.setup_project(amount=1000, members=(user,))
        codes = [_submit(env, user, a) for env in (a, b, a)]
        assert codes == [201, 201, 201]
        # the fourth, on either replica, is over the deployment-wide limit
        for env in (b, a):
            r = env.call("POST", "/v1/jobs", a.auth(user), json={
                "project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 5})
            assert r.status_code == 429, r.text
            assert r.json()["code"] == "rate_limited" and 1 <= int(r.headers["Retry-After"]) <= 60
        # another user has a window of their own
        other = f"rl-{uuid.uuid4().hex[:10]}"
        a.call("POST", "/v1/projects/EHPC-TEST-001/members", a.qm, json={"user": other, "role": "member"})
        a.call("PUT", f"/v1/clusters/local/accounts/{other}", a.qm, json={"username": other})
        assert _submit(b, other, a) == 201
        a.app.state.rate_limiter.reset(user)
        assert _submit(b, user, a) == 201


def test_in_process_window_is_per_replica(db_url: str, tmp_path: Path) -> None:
    """Without a shared store each replica counts alone (why the store exists)."""
    user = "alice"
    with two_replicas(tmp_path, db_url, rate_limit_per_minute=2) as (a, b):
        assert isinstance(a.app.state.rate_limiter, RateLimiter)
        a.setup_project(amount=1000, members=(user,))
        codes = [_submit(env, user, a) for env in (a, a, a, b, b, b)]
        assert codes == [201, 201, 429, 201, 201, 429]


def test_unreachable_store_lets_submissions_through() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    limiter = make_rate_limiter(1, dead)
    before = RATE_LIMIT_STORE_ERRORS._value.get()
    for _ in range(3):
        limiter.check("anyone")  # no exception: the flood guard fails open
    assert RATE_LIMIT_STORE_ERRORS._value.get() == before + 3


def test_off_means_no_store_is_used() -> None:
    assert isinstance(make_rate_limiter(0, "redis://127.0.0.1:1/0"), RateLimiter)
