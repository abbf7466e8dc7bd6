"""Cheap reads (issue 14 point 3): one query per job read or page, ETag /
If-None-Match, and no database write on the auth path for a known user."""

from __future__ import annotations

from tests.support.env import BrokerEnv
from tests.support.statements import statements


def _queries(seen: list[str]) -> list[str]:
    """What the request asked the database (SQLite's own BEGIN IMMEDIATE aside)."""
    return [s for s in seen if s not in {"BEGIN"}]


def _submit(env: BrokerEnv, who: dict[str, str], n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = env.call("POST", "/v1/jobs", who, json={"project": "EHPC-TEST-001", "script": "sleep 30",
                                                     "time_limit_minutes": 1})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def test_job_reads_are_one_query_each_for_every_role(env: BrokerEnv) -> None:
    env.setup_project(members=("alice", "bob"), pi="carol")
    ids = _submit(env, env.auth("alice"), 3) + _submit(env, env.auth("bob"), 2)
    for who in (env.auth("alice"), env.auth("carol"), env.qm):
        env.call("GET", "/v1/jobs", who)  # provisioning of the caller is not what we count
        with statements(env) as seen:
            r = env.call("GET", f"/v1/jobs/{ids[0]}", who)
        assert r.status_code == 200, r.text
        assert _queries(seen) == ["SELECT"], seen
        with statements(env) as seen:
            r = env.call("GET", "/v1/jobs?limit=2", who)
        assert r.status_code == 200 and len(r.json()["items"]) == 2, r.text
        assert _queries(seen) == ["SELECT"], seen
    # visibility still holds: bob sees his own, not alice's; the PI sees all five
    assert env.call("GET", f"/v1/jobs/{ids[0]}", env.auth("bob")).status_code == 404
    assert len(env.call("GET", "/v1/jobs", env.auth("bob")).json()["items"]) == 2
    assert len(env.call("GET", "/v1/jobs", env.auth("carol")).json()["items"]) == 5
    assert env.call("GET", f"/v1/jobs/{ids[0]}", env.auth("mallory")).status_code == 404
    for job_id in ids:
        owner = env.auth("alice") if job_id in ids[:3] else env.auth("bob")
        env.wait_job(job_id, owner, lambda j: j["scheduler_job_id"] is not None)
        assert env.call("DELETE", f"/v1/jobs/{job_id}", owner).status_code == 202


def test_auth_path_writes_nothing_for_a_known_user(env: BrokerEnv) -> None:
    env.setup_project()
    assert env.call("GET", "/v1/projects", env.auth("alice")).status_code == 200
    env.app.state.provisioned.clear()  # as a fresh process (another worker, a restart) would be
    with statements(env) as seen:
        assert env.call("GET", "/v1/projects", env.auth("alice")).status_code == 200
    assert not {"INSERT", "UPDATE", "DELETE"} & set(seen), seen
    with statements(env) as seen:  # a new user is written once
        assert env.call("GET", "/v1/projects", env.auth("newcomer")).status_code == 200
    assert seen.count("INSERT") == 1, seen


def test_etag_and_if_none_match(env: BrokerEnv) -> None:
    env.setup_project()
    alice = env.auth("alice")
    (job_id,) = _submit(env, alice, 1)
    env.wait_job(job_id, alice, lambda j: j["state"] == "RUNNING")
    for path in (f"/v1/jobs/{job_id}", "/v1/jobs"):
        first = env.call("GET", path, alice)
        tag = first.headers["etag"]
        assert tag.startswith('"') and tag.endswith('"')
        again = env.call("GET", path, alice, headers={"If-None-Match": tag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag
        other = env.call("GET", path, alice, headers={"If-None-Match": '"something-else"'})
        assert other.status_code == 200 and other.json() == first.json()
    assert env.call("DELETE", f"/v1/jobs/{job_id}", alice).status_code == 202
    env.wait_settled(job_id, alice)
    changed = env.call("GET", f"/v1/jobs/{job_id}", alice, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag
    # errors carry no ETag and are never 304
    missing = env.call("GET", "/v1/jobs/nope", alice, headers={"If-None-Match": "*"})
    assert missing.status_code == 404 and "etag" not in missing.headers
