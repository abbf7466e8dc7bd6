"""The read routes answer with JSON built without their response models (for CPU):
the bytes must be exactly what the models' own serialisation gives, for objects
with every kind of value — None fields, datetimes with microseconds, money in
micro-units (tiny, zero, huge), nested JSON, an array job, non-ASCII text."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import Session

from broker.auth import Principal
from broker.models import Job
from broker.schemas import JobOut, JobPage
from broker.services import jobs as job_service
from tests.support.env import BrokerEnv, broker_env


@pytest.fixture
def quiet_env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    """A broker whose tracker does not change the rows this test writes."""
    with broker_env(tmp_path, db_url, run_tracker=False) as e:
        yield e


def _submit(env: BrokerEnv, who: dict[str, str], **extra: object) -> str:
    r = env.call("POST", "/v1/jobs", who, json={"project": "EHPC-TEST-001", "script": "true",
                                                 "time_limit_minutes": 1, **extra})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _model_json(env: BrokerEnv, job_id: str) -> JobOut:
    """The job as the model builds it from the ORM row (the reference)."""
    with Session(env.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job_service.job_out_loaded(session, job)


def _finish(env: BrokerEnv, job_id: str) -> None:
    """Give the job a value of every kind its answer shows."""
    with Session(env.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.raw_state, job.exit_code = "COMPLETED", "COMPLETED", 0
        job.charged, job.estimated, job.reserved = 10**15 + 1, 1, 0
        job.elapsed_seconds = 3601
        job.started_at = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
        job.ended_at = datetime(2026, 1, 2, 4, 4, 5, 999_999, tzinfo=UTC)
        job.unknown_since = datetime(2026, 1, 2, 3, 30, tzinfo=UTC)
        job.reason = 'naïve "quoted" \\ ✓ \n'
        job.pending_reason, job.expected_start_at = "Priority", datetime(2027, 5, 6, 7, 8, 9, 123_000, tzinfo=UTC)
        job.placement = {"policy": "cheapest", "chosen": "local", "score": 0.1 + 0.2, "candidates": [
            {"cluster": "local", "estimate": 1e-7, "denials": []}]}
        session.add(job)
        session.commit()


def test_job_answers_are_the_models_json(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    env.setup_project(members=("alice",), pi="carol")
    alice = env.auth("alice")
    plain = _submit(env, alice)
    done = _submit(env, alice, name="ünïcode")
    array = _submit(env, alice, array="0-3%2")
    _finish(env, done)
    with Session(env.engine) as session:
        row = session.get(Job, array)
        assert row is not None
        row.array_counts = {"PENDING": 2, "COMPLETED": 2}
        session.add(row)
        session.commit()
    models = {j: _model_json(env, j) for j in (plain, done, array)}
    assert models[array].array is not None and models[done].charged is not None
    assert models[plain].charged is None and models[plain].started_at is None
    for who in (alice, env.auth("carol"), env.qm):  # owner, PI, quota manager: one answer
        for job_id, model in models.items():
            r = env.call("GET", f"/v1/jobs/{job_id}", who)
            assert r.status_code == 200, r.text
            assert r.content == model.model_dump_json().encode()
        page = env.call("GET", "/v1/jobs?limit=2", who)
        newest = [models[array], models[done]]
        cursor = page.json()["next_cursor"]
        assert cursor
        assert page.content == JobPage(items=newest, next_cursor=cursor).model_dump_json().encode()
        rest = env.call("GET", f"/v1/jobs?limit=2&cursor={cursor}", who)
        assert rest.content == JobPage(items=[models[plain]], next_cursor=None).model_dump_json().encode()
    # a unique prefix (the other path) answers the same bytes
    r = env.call("GET", f"/v1/jobs/{done[:12]}", alice)
    assert r.status_code == 200 and r.content == models[done].model_dump_json().encode()
    # the model-returning read (long poll, notifications) is the same job
    with Session(env.engine) as session:
        alice_p = Principal(name="alice", roles=frozenset())
        assert job_service.get_job(session, principal=alice_p, job_id=done) == models[done]
