"""Every eligibility deny path returns its code; visibility is 404; admin is 403."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.support.env import BrokerEnv, broker_env

JOB = {"project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 5}


def _submit(env: BrokerEnv, who: str, **over: object) -> tuple[int, dict]:
    r = env.call("POST", "/v1/jobs", env.auth(who), json={**JOB, **over})
    assert r.headers["content-type"].startswith("application/" + ("json" if r.status_code < 300 else "problem+json"))
    return r.status_code, r.json()


def test_non_member_gets_404_for_the_project_its_jobs_and_submission(env: BrokerEnv) -> None:
    env.setup_project()
    status, body = _submit(env, "mallory")
    assert (status, body["code"]) == (404, "not_found")
    status, body = _submit(env, "mallory", project="EHPC-DOES-NOT-EXIST")
    assert (status, body["code"]) == (404, "not_found")  # same answer: no existence oracle
    job = env.call("POST", "/v1/jobs", env.auth("alice"), json=JOB).json()
    for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("DELETE", f"/v1/jobs/{job['id']}"),
                         ("GET", "/v1/projects/EHPC-TEST-001"), ("GET", "/v1/projects/EHPC-TEST-001/usage"),
                         ("POST", "/v1/jobs/estimate")):
        r = env.call(method, path, env.auth("mallory"), json=JOB if method == "POST" else None)
        assert (r.status_code, r.json()["code"]) == (404, "not_found"), (method, path)
    assert env.call("GET", "/v1/jobs", env.auth("mallory")).json()["items"] == []
    assert env.call("GET", "/v1/projects", env.auth("mallory")).json() == []


def test_other_member_cannot_see_my_job_but_pi_and_qm_can(env: BrokerEnv) -> None:
    env.setup_project(members=("alice", "bob"), pi="carol")
    job = env.call("POST", "/v1/jobs", env.auth("alice"), json=JOB).json()
    assert env.call("GET", f"/v1/jobs/{job['id']}", env.auth("bob")).status_code == 404
    assert env.call("GET", f"/v1/jobs/{job['id']}", env.auth("carol")).status_code == 200
    assert env.call("GET", f"/v1/jobs/{job['id']}", env.qm).status_code == 200
    assert [j["id"] for j in env.call("GET", "/v1/jobs", env.auth("carol")).json()["items"]] == [job["id"]]


def test_another_projects_job_is_404(env: BrokerEnv) -> None:
    env.setup_project("EHPC-TEST-001", members=("alice",))
    env.setup_project("EHPC-TEST-002", members=("bob",), account="proj-b")
    job = env.call("POST", "/v1/jobs", env.auth("bob"), json={**JOB, "project": "EHPC-TEST-002"}).json()
    r = env.call("GET", f"/v1/jobs/{job['id']}", env.auth("alice"))
    assert (r.status_code, r.json()["code"]) == (404, "not_found")


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/projects", {"code": "X-1", "title": "x"}),
    ("PATCH", "/v1/projects/EHPC-TEST-001", {"title": "y"}),
    ("POST", "/v1/projects/EHPC-TEST-001/allocations", {"cluster": "local", "unit": "core_hours", "amount": 1, "account": "a"}),
    ("POST", "/v1/clusters", {"name": "c2", "adapter": "local"}),
    ("PATCH", "/v1/clusters/local", {"state": "offline"}),
    ("DELETE", "/v1/clusters/local", None),
    ("PUT", "/v1/clusters/local/accounts/alice", {"username": "root"}),
    ("GET", "/v1/usage", None),
    ("POST", "/v1/projects/EHPC-TEST-001/members", {"user": "eve", "role": "pi"}),
])
def test_plain_user_calling_admin_endpoints_gets_403(env: BrokerEnv, method: str, path: str, body: dict | None) -> None:
    env.setup_project()
    r = env.call(method, path, env.auth("alice"), json=body)
    assert (r.status_code, r.json()["code"]) == (403, "forbidden"), r.text


def test_pi_manages_members_of_own_project(env: BrokerEnv) -> None:
    env.setup_project(pi="carol")
    r = env.call("POST", "/v1/projects/EHPC-TEST-001/members", env.auth("carol"), json={"user": "dave"})
    assert r.status_code == 201
    assert env.call("DELETE", "/v1/projects/EHPC-TEST-001/members/dave", env.auth("carol")).status_code == 204


def test_project_inactive(env: BrokerEnv) -> None:
    env.setup_project()
    env.call("PATCH", "/v1/projects/EHPC-TEST-001", env.qm, json={"status": "suspended"})
    status, body = _submit(env, "alice")
    assert (status, body["code"]) == (403, "project_inactive")
    env.call("PATCH", "/v1/projects/EHPC-TEST-001", env.qm, json={
        "status": "active", "end_date": str(date.today() - timedelta(days=1))})
    assert _submit(env, "alice")[1]["code"] == "project_inactive"


def test_no_allocation_and_allocation_expired(env: BrokerEnv) -> None:
    env.call("POST", "/v1/projects", env.qm, json={"code": "EHPC-TEST-001", "title": "t"})
    env.call("POST", "/v1/projects/EHPC-TEST-001/members", env.qm, json={"user": "alice"})
    env.call("PUT", "/v1/clusters/local/accounts/alice", env.qm, json={"username": "alice"})
    status, body = _submit(env, "alice")
    assert (status, body["code"]) == (403, "no_allocation")
    yesterday = str(date.today() - timedelta(days=1))
    r = env.call("POST", "/v1/projects/EHPC-TEST-001/allocations", env.qm, json={
        "cluster": "local", "unit": "core_hours", "amount": 10, "account": "a",
        "start_date": "2025-01-01", "end_date": yesterday})
    assert r.status_code == 201
    status, body = _submit(env, "alice")
    assert (status, body["code"]) == (403, "allocation_expired")


def test_no_cluster_account(env: BrokerEnv) -> None:
    env.setup_project(map_accounts=False)
    status, body = _submit(env, "alice")
    assert (status, body["code"]) == (403, "no_cluster_account")
    assert "account" in body["detail"]


def test_quota_exceeded_is_409(env: BrokerEnv) -> None:
    env.setup_project(amount=0.05)
    status, body = _submit(env, "alice", time_limit_minutes=60)
    assert (status, body["code"]) == (409, "quota_exceeded")


def test_unknown_partition_is_422(env: BrokerEnv) -> None:
    env.setup_project()
    status, body = _submit(env, "alice", partition="nope")
    assert (status, body["code"]) == (422, "validation_error")


@pytest.fixture
def limited_env(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    limits = {"playground": {"allowed_partitions": ["cpu"], "max_nodes": 1, "max_gpus_per_job": 0,
                             "max_time_minutes": 60, "max_concurrent_jobs_per_user": 1,
                             "max_concurrent_jobs_per_project": 2}}
    with broker_env(tmp_path, db_url, access_modes=limits) as e:
        yield e


def test_partition_and_limits_and_concurrency(limited_env: BrokerEnv) -> None:
    env = limited_env
    env.setup_project(members=("alice", "bob", "carol"))
    assert _submit(env, "alice", partition="gpu")[1]["code"] == "partition_not_allowed"
    for over in ({"nodes": 2}, {"time_limit_minutes": 61}):
        status, body = _submit(env, "alice", **over)
        assert (status, body["code"]) == (403, "limit_exceeded"), over
    long = {"script": "sleep 30"}
    assert _submit(env, "alice", **long)[0] == 201
    status, body = _submit(env, "alice", **long)
    assert (status, body["code"]) == (403, "limit_exceeded") and "active jobs" in body["detail"]
    assert _submit(env, "bob", **long)[0] == 201
    status, body = _submit(env, "carol", **long)
    assert (status, body["code"]) == (403, "limit_exceeded") and "Project" in body["detail"]
    est = env.call("POST", "/v1/jobs/estimate", env.auth("alice"), json={**JOB, "partition": "gpu", "nodes": 2}).json()
    # the local cluster's gpu partition has one node: 2 nodes cannot fit it either
    assert [d["code"] for d in est["denials"]] == ["partition_not_allowed", "limit_exceeded", "limit_exceeded",
                                                   "exceeds_partition"]


@pytest.mark.parametrize(("configured", "known", "unknown"), [
    (True, "playground", "fast-lane"),  # configured: only the configured modes
    (False, "fast-lane", "fastlane"),  # nothing configured: the AI Factory modes, without limits
], ids=["configured", "defaults"])
def test_access_mode_must_be_a_configured_mode(db_url: str, tmp_path: Path, configured: bool, known: str,
                                               unknown: str) -> None:
    """An unknown access mode silently meant "no limits": it is a 422 naming the modes."""
    modes = {"playground": {"max_nodes": 1}} if configured else {}
    with broker_env(tmp_path, db_url, access_modes=modes) as e:
        r = e.call("POST", "/v1/projects", e.qm, json={"code": "P-X", "title": "x", "access_mode": unknown})
        assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
        assert f"'{unknown}'" in r.json()["detail"] and known in r.json()["detail"]
        r = e.call("POST", "/v1/projects", e.qm, json={"code": "P-X", "title": "x", "access_mode": known})
        assert r.status_code == 201, r.text
        r = e.call("PATCH", "/v1/projects/P-X", e.qm, json={"access_mode": unknown})
        assert r.status_code == 422 and f"'{unknown}'" in r.json()["detail"]
        assert e.call("GET", "/v1/projects/P-X", e.qm).json()["access_mode"] == known


def test_order_of_denials_gives_first_reason(env: BrokerEnv) -> None:
    # suspended project AND no account: the project state comes first
    env.setup_project(map_accounts=False)
    env.call("PATCH", "/v1/projects/EHPC-TEST-001", env.qm, json={"status": "suspended"})
    assert _submit(env, "alice")[1]["code"] == "project_inactive"
