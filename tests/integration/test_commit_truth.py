"""A 2xx answer means the change is committed (issue 10 point 1).

Every state change commits inside the endpoint's unit of work, before the answer;
a failed commit becomes the right problem answer: a foreign key → 409 ``conflict``
naming what depends on it, a unique key → 409, the database gone → 503
``database_unavailable`` with ``Retry-After`` (and immediate recovery)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.support.env import LOCAL_TEST_CONNECTION, BrokerEnv, broker_env, fresh_database
from tests.support.server import live_server
from tests.support.tcpproxy import TcpProxy


def _add_cluster(env: BrokerEnv, name: str) -> None:
    r = env.call("POST", "/v1/clusters", env.qm, json={
        "name": name, "adapter": "local", "connection": LOCAL_TEST_CONNECTION, "default_partition": "cpu"})
    assert r.status_code == 201, r.text


def _cluster_exists(env: BrokerEnv, name: str) -> bool:
    with env.engine.connect() as conn:
        return conn.execute(sa.text("SELECT COUNT(*) FROM clusters WHERE name = :n"), {"n": name}).scalar() == 1


def _reference_cluster_from_imported_job(env: BrokerEnv, cluster: str) -> None:
    """An imported accounting record on ``cluster`` (the service's own pre-check of a
    delete does not look at these, so only the database refuses the delete)."""
    env.setup_project(map_accounts=False)
    with env.engine.begin() as conn:
        cid = conn.execute(sa.text("SELECT id FROM clusters WHERE name = :n"), {"n": cluster}).scalar()
        aid = conn.execute(sa.text("SELECT id FROM allocations")).scalar()
        conn.execute(sa.text(
            "INSERT INTO imported_jobs (cluster_id, allocation_id, scheduler_job_id, submit_time, account, "
            "username, state, elapsed_seconds, alloc_tres, charged, created_at) VALUES (:c, :a, '77', :t, "
            "'proj-a', 'alice', 'COMPLETED', 0, '{}', 0, :t)"), {"c": cid, "a": aid, "t": datetime.now(UTC)})


def _defer_foreign_keys(env: BrokerEnv) -> None:
    """Make foreign keys checked at COMMIT (not at the statement), so the failure
    happens exactly where the old code had already answered."""
    if env.engine.dialect.name == "sqlite":
        sa.event.listen(env.engine, "begin", lambda conn: conn.exec_driver_sql("PRAGMA defer_foreign_keys = ON"))
        return
    with env.engine.begin() as conn:
        name = conn.execute(sa.text(
            "SELECT conname FROM pg_constraint WHERE contype = 'f' AND conrelid = 'imported_jobs'::regclass "
            "AND confrelid = 'clusters'::regclass")).scalar()
        conn.execute(sa.text(f'ALTER TABLE imported_jobs ALTER CONSTRAINT "{name}" DEFERRABLE INITIALLY DEFERRED'))


@pytest.mark.parametrize("checked_at", ["statement", "commit"])
def test_commit_failure_is_never_answered_2xx(env: BrokerEnv, checked_at: str) -> None:
    _add_cluster(env, "doomed")
    _reference_cluster_from_imported_job(env, "doomed")
    if checked_at == "commit":
        _defer_foreign_keys(env)
    r = env.call("DELETE", "/v1/clusters/doomed", env.qm)
    assert r.status_code == 409, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "conflict"
    if checked_at == "statement" or env.engine.dialect.name == "postgresql":
        assert "imported_jobs" in r.json()["detail"], r.json()  # what depends on it
    else:  # SQLite does not say which table a deferred check failed on
        assert "still referenced" in r.json()["detail"], r.json()
    assert _cluster_exists(env, "doomed")
    # the session went back to the pool clean: the next request works
    assert env.call("GET", "/v1/clusters/doomed", env.qm).status_code == 200


def test_delete_of_cluster_with_mapped_account_is_done_when_answered(env: BrokerEnv) -> None:
    _add_cluster(env, "spare")
    r = env.call("PUT", "/v1/clusters/spare/accounts/alice", env.qm, json={"username": "alice"})
    assert r.status_code == 200, r.text
    r = env.call("DELETE", "/v1/clusters/spare", env.qm)
    assert r.status_code == 204, r.text
    assert not _cluster_exists(env, "spare")


def test_patch_answer_matches_what_is_stored(env: BrokerEnv) -> None:
    """Whatever the verdict on an unusual value, a 2xx means it was stored."""
    for weight in ("Infinity", 1e308, 2.5):
        r = env.call("PATCH", "/v1/clusters/local", env.qm,
                     content=f'{{"cost_model": {{"cpu": {{"core_hours": {{"cpu": {weight}}}}}}}}}',
                     headers={"content-type": "application/json"})
        assert r.status_code < 500, r.text
        stored = env.call("GET", "/v1/clusters/local", env.qm).json()
        if r.status_code < 300:
            assert stored["cost_model"] == r.json()["cost_model"], (weight, r.json(), stored)
        else:
            assert r.headers["content-type"] == "application/problem+json"


def test_20_concurrent_creates_of_one_project_give_one_201_and_19_409(env: BrokerEnv) -> None:
    body = {"code": "EHPC-RACE-001", "title": "race", "status": "active", "access_mode": "playground"}
    with live_server(env.app) as base, httpx.Client(base_url=base, timeout=60) as client:
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda _: client.post("/v1/projects", json=body, headers=env.qm), range(20)))
    codes = Counter((r.status_code, r.json()["code"]) for r in answers)
    assert codes == Counter({(201, "EHPC-RACE-001"): 1, (409, "conflict"): 19}), codes
    assert all(r.headers["content-type"] == "application/problem+json" for r in answers if r.status_code == 409)
    with env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM projects WHERE code = 'EHPC-RACE-001'")).scalar() == 1


# --- the database goes away ----------------------------------------------------------------

@pytest.fixture
def proxied_pg(tmp_path: Path) -> Iterator[tuple[BrokerEnv, TcpProxy]]:
    """A broker whose PostgreSQL connections all pass through a local TCP proxy."""
    with fresh_database("postgresql", tmp_path, migrated=True) as url, TcpProxy("127.0.0.1", 5432) as proxy:
        proxied = url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
        assert proxied != url
        with broker_env(tmp_path, proxied, run_tracker=False) as e:
            yield e, proxy


def _timed(env: BrokerEnv, method: str, path: str, **kw: Any) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = env.call(method, path, env.qm, **kw)
    return r, time.monotonic() - start


def test_database_cut_is_503_then_recovers_at_once(proxied_pg: tuple[BrokerEnv, TcpProxy]) -> None:
    env, proxy = proxied_pg
    env.setup_project()
    assert env.call("GET", "/v1/projects/EHPC-TEST-001", env.qm).status_code == 200
    proxy.cut()
    seen = Counter()
    for i in range(12):
        for method, path, kw in (("GET", "/v1/projects/EHPC-TEST-001", {}),
                                 ("GET", "/v1/jobs", {}),
                                 ("POST", "/v1/projects", {"json": {"code": f"EHPC-CUT-{i:03d}", "title": "t"}})):
            r, took = _timed(env, method, path, **kw)
            seen[r.status_code] += 1
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            assert r.json()["code"] == "database_unavailable"
            assert r.headers["content-type"] == "application/problem+json"
            assert int(r.headers["retry-after"]) > 0
            assert took < 8, f"{method} {path} took {took:.1f}s to say the database is gone"
    proxy.restore()
    r, took = _timed(env, "GET", "/v1/projects/EHPC-TEST-001")
    assert r.status_code == 200, r.text  # the very first request after the outage
    r = env.call("POST", "/v1/projects", env.qm, json={"code": "EHPC-AFTER-001", "title": "t"})
    assert r.status_code == 201, r.text
    with env.engine.connect() as conn:  # nothing of the outage's writes got through
        assert conn.execute(sa.text("SELECT COUNT(*) FROM projects WHERE code LIKE 'EHPC-CUT-%'")).scalar() == 0


# --- a lost race is run again, boundedly ---------------------------------------------------

def _fail_project_inserts(env: BrokerEnv, times: int) -> None:
    """The next ``times`` inserts into projects fail with a serialization failure (a
    sequence counts them: it is not rolled back with the failed transaction)."""
    with env.engine.begin() as conn:
        conn.execute(sa.text("CREATE SEQUENCE injected_failures"))
        conn.execute(sa.text(f"""
            CREATE FUNCTION fail_some() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF nextval('injected_failures') <= {int(times)} THEN
                RAISE EXCEPTION 'injected' USING ERRCODE = 'serialization_failure';
              END IF;
              RETURN NEW;
            END $$"""))
        conn.execute(sa.text("CREATE TRIGGER fail_some BEFORE INSERT ON projects FOR EACH ROW EXECUTE FUNCTION "
                             "fail_some()"))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_serialization_failure_is_run_again(env: BrokerEnv) -> None:
    _fail_project_inserts(env, 2)  # two lost races, the third attempt commits
    r = env.call("POST", "/v1/projects", env.qm, json={"code": "EHPC-RETRY-001", "title": "t"})
    assert r.status_code == 201, r.text
    with env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM projects WHERE code = 'EHPC-RETRY-001'")).scalar() == 1
        assert conn.execute(sa.text("SELECT last_value FROM injected_failures")).scalar() == 3


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_serialization_failure_that_persists_is_503_after_a_bounded_number_of_tries(env: BrokerEnv) -> None:
    _fail_project_inserts(env, 100)
    r = env.call("POST", "/v1/projects", env.qm, json={"code": "EHPC-RETRY-002", "title": "t"})
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "database_unavailable" and int(r.headers["retry-after"]) > 0
    with env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT last_value FROM injected_failures")).scalar() == 3  # RETRIES
        assert conn.execute(sa.text("SELECT COUNT(*) FROM projects WHERE code = 'EHPC-RETRY-002'")).scalar() == 0
