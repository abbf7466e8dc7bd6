"""A plain submission's writes (broker/services/single_statement.py): on PostgreSQL
each is one statement in autocommit; refused for its budget, it writes nothing; a
job with an idempotency key or an array still runs in one transaction. On SQLite
every submission runs in transactions. Both databases."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from broker.auth import Authenticator
from broker.db import session_scope
from broker.schemas import JobRequest
from broker.services import ledger, single_statement
from broker.services.jobs import _reserve
from tests.support.env import BrokerEnv
from tests.support.statements import statements

BODY = {"project": "EHPC-TEST-001", "cluster": "local", "script": "sleep 30", "time_limit_minutes": 60}


def _counts(env: BrokerEnv) -> dict[str, int]:
    with env.engine.connect() as conn:
        return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                for t in ("jobs", "job_events", "ledger_entries")} | {
            "reserved": conn.execute(sa.text("SELECT reserved FROM allocations")).scalar_one()}


def _cancel(env: BrokerEnv, job_id: str) -> None:
    who = env.auth("alice")
    env.wait_job(job_id, who, lambda j: j["scheduler_job_id"] is not None)
    assert env.call("DELETE", f"/v1/jobs/{job_id}", who).status_code == 202


def test_a_plain_submission_writes_in_one_statement_per_step(env: BrokerEnv) -> None:
    env.setup_project(amount=2.0)  # two 1-core-hour jobs
    who = env.auth("alice")
    env.call("GET", "/v1/projects", who)  # the caller's first sight is not what we count
    with statements(env) as seen:
        r = env.call("POST", "/v1/jobs", who, json=BODY)
    assert r.status_code == 201, r.text
    job = r.json()
    if env.engine.dialect.name == "postgresql":
        # read the subject; reserve + job row + event + ledger row; record the scheduler id + event
        assert seen == ["SELECT", "WITH", "WITH"], seen
    else:
        assert "WITH" not in seen and seen.count("INSERT") >= 3, seen
    # what the one statement wrote is what the transaction wrote
    with env.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT state, scheduler_job_id, reserved, request FROM jobs WHERE id = :i"),
                           {"i": job["id"]}).one()
        states = conn.execute(sa.text("SELECT previous_state, state FROM job_events WHERE job_id = :i "
                                      "AND id > 0 ORDER BY id"), {"i": job["id"]}).all()
        entry = conn.execute(sa.text("SELECT kind, amount, actor FROM ledger_entries WHERE job_id = :i"),
                             {"i": job["id"]}).all()
    assert row.scheduler_job_id == job["scheduler_job_id"] and row.scheduler_job_id is not None
    assert row.reserved == 1_000_000 and entry == [("reserve", 1_000_000, "alice")]
    assert [tuple(s) for s in states][:2] == [(None, "ACCEPTED"), ("ACCEPTED", "PENDING")], states
    assert job["state"] == "PENDING" and job["reserved"] == {"unit": "core_hours", "amount": 1.0}
    _cancel(env, job["id"])
    env.wait_settled(job["id"], env.qm)
    with session_scope(env.engine) as s:
        assert ledger.check(s) == []


def test_a_submission_over_budget_writes_nothing(env: BrokerEnv) -> None:
    env.setup_project(amount=1.0)
    who = env.auth("alice")
    first = env.call("POST", "/v1/jobs", who, json=BODY)
    assert first.status_code == 201, first.text
    before = _counts(env)
    r = env.call("POST", "/v1/jobs", who, json=BODY)
    assert (r.status_code, r.json()["code"]) == (409, "quota_exceeded"), r.text
    assert r.json()["remaining"] == {"unit": "core_hours", "amount": 0.0}, r.json()
    after = _counts(env)
    # the tracker may add the first job's own events meanwhile; nothing of a second job
    assert {k: after[k] for k in ("jobs", "ledger_entries", "reserved")} == \
        {k: before[k] for k in ("jobs", "ledger_entries", "reserved")}
    with env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(DISTINCT job_id) FROM job_events")).scalar_one() == 1
    _cancel(env, first.json()["id"])


def test_a_keyed_or_array_submission_runs_in_a_transaction(env: BrokerEnv) -> None:
    env.setup_project(amount=100.0)
    who = env.auth("alice")
    env.call("GET", "/v1/projects", who)
    with statements(env) as seen:
        keyed = env.call("POST", "/v1/jobs", {**who, "Idempotency-Key": "k-1"}, json=BODY)
    assert keyed.status_code == 201, keyed.text
    assert "INSERT" in seen, seen  # the key's claim, the job row: written in the transaction
    array = {**BODY, "script": "#!/bin/sh\n#SBATCH --array=0-2\nsleep 30\n", "time_limit_minutes": 5}
    with statements(env) as seen:
        r = env.call("POST", "/v1/jobs", who, json=array)
    assert r.status_code == 201, r.text
    assert "INSERT" in seen and "WITH" not in seen[1:2], seen
    with env.engine.connect() as conn:
        tasks = conn.execute(sa.text("SELECT count(*) FROM job_tasks WHERE job_id = :i"),
                             {"i": r.json()["id"]}).scalar_one()
    assert tasks == 3
    for job_id in (keyed.json()["id"], r.json()["id"]):
        _cancel(env, job_id)
    for job_id in (keyed.json()["id"], r.json()["id"]):
        env.wait_settled(job_id, env.qm)
    with session_scope(env.engine) as s:
        assert ledger.check(s) == []


def test_recording_the_scheduler_id_commits_asynchronously_for_its_own_transaction_only(env: BrokerEnv) -> None:
    """The record step is committed without waiting for the WAL flush (a crash loses at
    most that step, which the reconciler redoes); the setting is local to the
    statement's transaction, so the pooled connection's later statements (the next
    reservation) commit synchronously again."""
    if env.engine.dialect.name != "postgresql":
        pytest.skip("the single-statement path is PostgreSQL's")
    env.setup_project(amount=10.0)
    principal = Authenticator(env.settings).authenticate(env.token("alice"))
    body = JobRequest(project="EHPC-TEST-001", script="true", time_limit_minutes=5)
    job, _, _ = _reserve(env.engine, env.settings, principal, body, None)
    at = datetime.now(UTC)
    with env.engine.connect() as conn:
        # in a transaction here, to look at the setting before its end
        assert single_statement.record_submitted(conn, job_id=job.id, scheduler_job_id="4242", at=at)
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "off"
        conn.commit()
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"
        # a job no longer ACCEPTED: nothing moves, nothing is set
        assert not single_statement.record_submitted(conn, job_id=job.id, scheduler_job_id="4243", at=at)
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "on"
        conn.rollback()
        row = conn.execute(sa.text("SELECT state, scheduler_job_id FROM jobs WHERE id = :i"), {"i": job.id}).one()
    assert tuple(row) == ("PENDING", "4242")
