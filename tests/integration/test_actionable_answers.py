"""Answers a user can act on (issue 8 point 7): a quota refusal with the numbers,
job ids by unique prefix (never across projects), case-insensitive state filters,
the caller's budget, and the CLI's ``job wait`` / ``job output --follow`` /
``budget`` against a real server on loopback."""

from __future__ import annotations

import itertools
import json
import time
import types
import uuid

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.client import _new_part
from tests.support.env import BrokerEnv
from tests.support.server import live_server


def _submit(env: BrokerEnv, who: str, project: str = "EHPC-TEST-001", **over: object) -> dict:
    # 60 minutes: the test cluster runs a minute in a second (time_scale 1), and a job the
    # test expects still RUNNING a few steps later must not reach its limit first on a
    # loaded machine (with 5 it timed out after 5 s, before the test got to cancel it)
    body = {"project": project, "script": "#!/bin/sh\nsleep 60\n", "time_limit_minutes": 60, **over}
    r = env.call("POST", "/v1/jobs", env.auth(who), json=body)
    assert r.status_code in (201, 202), r.text
    return dict(r.json())


def test_quota_exceeded_carries_the_estimate_and_what_is_left(env: BrokerEnv) -> None:
    env.setup_project(amount=1.5)  # core_hours
    first = _submit(env, "alice", time_limit_minutes=60, cpus_per_task=1)  # reserves 1 core-hour
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 60, "cpus_per_task": 2})
    body = r.json()
    assert (r.status_code, body["code"]) == (409, "quota_exceeded")
    assert r.headers["content-type"].startswith("application/problem+json")
    assert body["estimated_cost"] == {"unit": "core_hours", "amount": 2.0}
    assert body["remaining"] == {"unit": "core_hours", "amount": 0.5}
    assert "2 core_hours" in body["detail"] and "0.5 core_hours" in body["detail"]
    # the estimate endpoint says the same before anything is tried
    verdict = env.call("POST", "/v1/jobs/estimate", env.auth("alice"), json={
        "project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 60, "cpus_per_task": 2}).json()
    assert verdict["estimated_cost"]["amount"] == 2.0 and verdict["remaining"]["amount"] == 0.5
    env.call("DELETE", f"/v1/jobs/{first['id']}", env.auth("alice"))


@pytest.fixture
def chosen_ids(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Job ids handed out in this order (so that prefixes collide on purpose)."""
    ids: list[str] = []
    counter = itertools.count()

    def next_id() -> uuid.UUID:
        return uuid.UUID(ids[next(counter)])

    import broker.services.jobs as jobs_module

    monkeypatch.setattr(jobs_module, "uuid", types.SimpleNamespace(uuid4=next_id))
    return ids


def test_job_ids_accept_a_unique_prefix_among_the_callers_jobs_only(env: BrokerEnv, chosen_ids: list[str]) -> None:
    env.setup_project("EHPC-TEST-001", members=("alice",))
    env.setup_project("EHPC-TEST-002", members=("bob",), account="proj-b")
    chosen_ids += ["abcd1111" + "0" * 24, "abcd2222" + "0" * 24, "abcd3333" + "0" * 24, "fe" * 16]
    a1 = _submit(env, "alice")
    a2 = _submit(env, "alice")
    b3 = _submit(env, "bob", project="EHPC-TEST-002")
    b4 = _submit(env, "bob", project="EHPC-TEST-002")
    alice, bob = env.auth("alice"), env.auth("bob")
    assert env.call("GET", "/v1/jobs/abcd1", alice).json()["id"] == a1["id"]
    assert env.call("GET", "/v1/jobs/ABCD2", alice).json()["id"] == a2["id"]
    # ambiguous among alice's own jobs: a clear 409 that names no job
    r = env.call("GET", "/v1/jobs/abcd", alice)
    assert (r.status_code, r.json()["code"]) == (409, "ambiguous_job_id")
    assert a1["id"] not in r.text and a2["id"] not in r.text and b3["id"] not in r.text
    # bob has one abcd job of his own: for him the same prefix is unique (alice's are invisible)
    assert env.call("GET", "/v1/jobs/abcd", bob).json()["id"] == b3["id"]
    # another project's job by prefix: not found, exactly like a job that does not exist
    for prefix in ("abcd3", "fefe", b4["id"]):
        r = env.call("GET", f"/v1/jobs/{prefix}", alice)
        assert (r.status_code, r.json()["code"]) == (404, "not_found"), prefix
    # too short to be a prefix, or not hex: plain not found
    for bad in ("abc", "abcd%25", "ab_d"):
        assert env.call("GET", f"/v1/jobs/{bad}", alice).status_code == 404
    # cancel and output take prefixes too
    env.wait_job(a1["id"], alice, lambda j: j["state"] == "RUNNING")
    assert env.call("DELETE", "/v1/jobs/abcd1", alice).json()["id"] == a1["id"]
    assert env.wait_settled(a1["id"], alice)["state"] == "CANCELLED"
    assert env.call("GET", "/v1/jobs/abcd1/output", alice).status_code == 200
    for job in (a2, b3, b4):
        env.call("DELETE", f"/v1/jobs/{job['id']}", env.auth(job["user"]))


def test_state_filters_are_case_insensitive(env: BrokerEnv) -> None:
    env.setup_project()
    job = _submit(env, "alice")
    alice = env.auth("alice")
    env.wait_job(job["id"], alice, lambda j: j["state"] == "RUNNING")
    for word in ("RUNNING", "running", "Running"):
        items = env.call("GET", "/v1/jobs", alice, params={"state": word}).json()["items"]
        assert [j["id"] for j in items] == [job["id"]], word
    assert env.call("GET", "/v1/jobs", alice, params={"state": "completed"}).json()["items"] == []
    r = env.call("GET", "/v1/jobs", alice, params={"state": "finished"})
    assert (r.status_code, r.json()["code"]) == (422, "validation_error")
    assert "RUNNING" in r.json()["detail"]
    env.call("DELETE", f"/v1/jobs/{job['id']}", alice)


def test_budget_shows_the_callers_projects_with_burn_rate(env: BrokerEnv) -> None:
    env.setup_project("EHPC-TEST-001", amount=10, members=("alice",))
    env.setup_project("EHPC-TEST-002", amount=20, members=("bob",), account="proj-b")
    alice = env.auth("alice")
    job = _submit(env, "alice", script="#!/bin/sh\nsleep 2\n", cpus_per_task=4)
    env.wait_settled(job["id"], alice)
    answer = env.call("GET", "/v1/budget", alice).json()
    assert answer["user"] == "alice"
    [row] = answer["allocations"]
    assert (row["project"], row["cluster"], row["unit"], row["granted"], row["role"]) == \
        ("EHPC-TEST-001", "local", "core_hours", 10.0, "member")
    assert row["used"] > 0 and row["reserved"] == 0
    assert abs(row["remaining"] - (10 - row["used"])) < 1e-6
    assert row["burn_rate_per_day"] > 0
    # a tiny burn: no date within ten years (the forecast says why instead)
    assert (row["projected_exhaustion"], row["forecast"]) == (None, "beyond_horizon")
    assert env.call("GET", "/v1/budget", env.auth("nobody")).json()["allocations"] == []
    # a quota manager sees only projects they are a member of here (the portfolio is /v1/usage)
    assert env.call("GET", "/v1/budget", env.qm).json()["allocations"] == []

    runner = CliRunner()
    with live_server(env.app) as base:
        out = runner.invoke(app, ["budget"], env={"AIFA_BROKER_URL": base, "AIFA_BROKER_TOKEN": env.token("alice")})
        assert out.exit_code == 0, out.output
        lines = out.output.splitlines()
        assert lines[0].split()[:4] == ["PROJECT", "CLUSTER", "UNIT", "GRANTED"]
        assert lines[1].split()[:4] == ["EHPC-TEST-001", "local", "core_hours", "10"]
        assert "EHPC-TEST-002" not in out.output
        as_json = runner.invoke(app, ["budget", "--json"],
                                env={"AIFA_BROKER_URL": base, "AIFA_BROKER_TOKEN": env.token("alice")})
        assert json.loads(as_json.output)["allocations"][0]["project"] == "EHPC-TEST-001"


def test_cli_job_wait_exits_with_the_jobs_exit_code(env: BrokerEnv) -> None:
    env.setup_project()
    runner = CliRunner()
    with live_server(env.app) as base:
        common = {"AIFA_BROKER_URL": base, "AIFA_BROKER_TOKEN": env.token("alice")}
        failing = _submit(env, "alice", script="#!/bin/sh\nsleep 1\nexit 3\n")
        out = runner.invoke(app, ["job", "wait", failing["id"][:8]], env=common)
        assert out.exit_code == 3, out.output
        assert "FAILED" in out.output
        fine = _submit(env, "alice", script="#!/bin/sh\ntrue\n")
        out = runner.invoke(app, ["job", "wait", fine["id"], "--json"], env=common)
        assert out.exit_code == 0 and json.loads(out.output)["state"] == "COMPLETED"
        slow = _submit(env, "alice", script="#!/bin/sh\nsleep 60\n")
        started = time.monotonic()
        out = runner.invoke(app, ["job", "wait", slow["id"], "--timeout", "1"], env=common)
        assert out.exit_code == 124 and time.monotonic() - started < 10, out.output
        env.call("DELETE", f"/v1/jobs/{slow['id']}", env.auth("alice"))
        out = runner.invoke(app, ["job", "wait", slow["id"]], env=common)
        assert out.exit_code == 128 + 15 or out.exit_code == 1, out.output
        assert "CANCELLED" in out.output
        missing = runner.invoke(app, ["job", "wait", "0" * 32], env=common)
        assert missing.exit_code == 1 and "[not_found]" in missing.output


def test_cli_job_output_follow_prints_everything_once(env: BrokerEnv) -> None:
    env.setup_project()
    script = "#!/bin/sh\nfor i in 1 2 3 4 5; do echo line-$i; sleep 0.4; done\n"
    runner = CliRunner()
    with live_server(env.app) as base:
        common = {"AIFA_BROKER_URL": base, "AIFA_BROKER_TOKEN": env.token("alice")}
        job = _submit(env, "alice", script=script)
        out = runner.invoke(app, ["job", "output", job["id"], "--follow", "--interval", "0.3"], env=common)
        assert out.exit_code == 0, out.output
        assert out.output == "".join(f"line-{i}\n" for i in range(1, 6))


def test_follow_joins_tails_without_repeating() -> None:
    assert _new_part("", "a\n", 100) == "a\n"
    assert _new_part("a\n", "a\nb\n", 100) == "b\n"
    # past the window: the old tail's end anchors the new tail
    before = "".join(f"{i:05d}" for i in range(4000))
    now = before + "NEW"
    assert _new_part(before[-5000:], now[-5000:], 5000) == "NEW"
    assert _new_part("abc" * 3000, "zzz" * 3000, 5000).startswith("[... output skipped ...]")
