"""Bad input always gets a 4xx problem+json with a stable code, never a 500."""

from __future__ import annotations

import json

import pytest

from tests.support.env import BrokerEnv

GOOD = {"project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 5}


def _problem(r, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["detail"]
    return body


@pytest.mark.parametrize("override", [
    {"nodes": "two"}, {"nodes": -1}, {"nodes": 0}, {"gpus_per_node": -4}, {"cpus_per_task": 1.5},
    {"time_limit_minutes": 0}, {"time_limit_minutes": 10**9}, {"time_limit_minutes": "5"},
    {"memory_per_node_mb": -1}, {"script": ""}, {"script": 42}, {"script": "a\x00b"},
    {"project": None}, {"project": "../../etc"}, {"environment": {"1BAD": "x"}},
    {"environment": {"OK": 5}}, {"environment": ["A=1"]}, {"environment": {"A": "x\x00"}},
    {"working_directory": "relative/path"}, {"name": "a\nb"}, {"partition": "a b"},
    {"unknown_field": 1}, {"nodes": True}, {"nodes": 10**30},
])
def test_invalid_job_fields_are_422(env: BrokerEnv, override: dict) -> None:
    env.setup_project()
    body = _problem(env.call("POST", "/v1/jobs", env.auth("alice"), json={**GOOD, **override}),
                    422, "validation_error")
    assert body["errors"] and all("field" in e for e in body["errors"])


def test_every_problem_is_listed(env: BrokerEnv) -> None:
    env.setup_project()
    body = _problem(env.call("POST", "/v1/jobs", env.auth("alice"),
                             json={"nodes": -1, "extra": 1}), 422, "validation_error")
    fields = {e["field"] for e in body["errors"]}
    # time_limit_minutes may come from the script's #SBATCH --time instead (issue 8)
    assert {"project", "script", "nodes", "extra"} <= fields


def test_absurd_time_limit_beyond_site_maximum(env: BrokerEnv) -> None:
    env.setup_project()
    _problem(env.call("POST", "/v1/jobs", env.auth("alice"), json={**GOOD, "time_limit_minutes": 500_000}),
             422, "validation_error")


def test_ten_megabyte_script_is_413_without_reading_it(env: BrokerEnv) -> None:
    env.setup_project()
    big = json.dumps({**GOOD, "script": "x" * (10 * 1024 * 1024)})
    r = env.call("POST", "/v1/jobs", env.auth("alice"), content=big,
                 headers={"Content-Type": "application/json"})
    _problem(r, 413, "payload_too_large")


def test_script_over_site_limit_but_under_body_limit_is_422(env: BrokerEnv) -> None:
    env.setup_project()
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json={**GOOD, "script": "x" * (600 * 1024)})
    _problem(r, 422, "validation_error")


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b"\xff\xfe", b'{"project": ' + b"[" * 5000])
def test_broken_json_is_422(env: BrokerEnv, raw: bytes) -> None:
    env.setup_project()
    r = env.call("POST", "/v1/jobs", env.auth("alice"), content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422) and r.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/projects", {"code": "A B", "title": "t"}),
    ("POST", "/v1/projects", {"code": "X-2", "title": "t", "start_date": "2026-02-01", "end_date": "2026-01-01"}),
    ("POST", "/v1/projects", {"code": "X-3", "title": "t", "status": "weird"}),
    ("POST", "/v1/projects/EHPC-TEST-001/allocations", {"cluster": "local", "unit": "euros", "amount": 1, "account": "a"}),
    ("POST", "/v1/projects/EHPC-TEST-001/allocations", {"cluster": "local", "unit": "gpu_hours", "amount": -5, "account": "a"}),
    ("POST", "/v1/projects/EHPC-TEST-001/allocations", {"cluster": "local", "unit": "gpu_hours", "amount": "NaN", "account": "a"}),
    ("PUT", "/v1/clusters/local/accounts/bob", {"username": "-rf"}),
    ("PUT", "/v1/clusters/local/accounts/bob", {"username": "bob; rm -rf /"}),
    ("POST", "/v1/clusters", {"name": "x", "adapter": "local", "cost_model": {"partitions": {"*": {"euros": {}}}}}),
    ("POST", "/v1/projects/EHPC-TEST-001/members", {"user": "x", "role": "owner"}),
    ("PATCH", "/v1/projects/EHPC-TEST-001/allocations/1", {"amount": 0.0001}),
])
def test_admin_bad_input_is_422(env: BrokerEnv, method: str, path: str, body: dict) -> None:
    env.setup_project()
    env.call("POST", "/v1/jobs", env.auth("alice"), json={**GOOD, "script": "sleep 5"})  # reserves budget
    r = env.call(method, path, env.qm, json=body)
    _problem(r, 422, "validation_error")


def test_bad_query_parameters_and_cursor(env: BrokerEnv) -> None:
    env.setup_project()
    alice = env.auth("alice")
    _problem(env.call("GET", "/v1/jobs", alice, params={"limit": 0}), 422, "validation_error")
    _problem(env.call("GET", "/v1/jobs", alice, params={"cursor": "!!!not-base64"}), 422, "validation_error")
    _problem(env.call("GET", "/v1/projects/EHPC-TEST-001/usage", alice, params={"group_by": "planet"}),
             422, "validation_error")
    _problem(env.call("GET", "/v1/projects/EHPC-TEST-001/usage", alice, params={"from": "yesterday"}),
             422, "validation_error")
    _problem(env.call("GET", "/v1/jobs/" + "x" * 5000, alice), 404, "not_found")
    _problem(env.call("GET", "/v1/nope", alice), 404, "not_found")


def test_bad_idempotency_key(env: BrokerEnv) -> None:
    env.setup_project()
    r = env.call("POST", "/v1/jobs", {**env.auth("alice"), "Idempotency-Key": "k" * 300}, json=GOOD)
    _problem(r, 422, "validation_error")


def test_nothing_was_created_by_bad_requests(env: BrokerEnv) -> None:
    env.setup_project()
    for override in ({"nodes": -1}, {"unknown": 1}):
        env.call("POST", "/v1/jobs", env.auth("alice"), json={**GOOD, **override})
    assert env.call("GET", "/v1/jobs", env.auth("alice")).json()["items"] == []
    alloc = env.call("GET", "/v1/projects/EHPC-TEST-001", env.auth("alice")).json()["allocations"][0]
    assert alloc["reserved"] == 0


def test_rate_limit_gives_429_with_retry_after(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.support.env import broker_env

    with broker_env(tmp_path, db_url, rate_limit_per_minute=3) as env:
        env.setup_project(amount=1000)
        codes = [env.call("POST", "/v1/jobs", env.auth("alice"), json=GOOD).status_code for _ in range(3)]
        assert codes == [201, 201, 201]
        r = env.call("POST", "/v1/jobs", env.auth("alice"), json=GOOD)
        body = _problem(r, 429, "rate_limited")
        assert 1 <= int(r.headers["Retry-After"]) <= 60 and body["detail"]
        # other users are not affected
        env.setup_project("EHPC-TEST-002", members=("bob",), account="proj-b")
        assert env.call("POST", "/v1/jobs", env.auth("bob"), json={**GOOD, "project": "EHPC-TEST-002"}).status_code == 201
