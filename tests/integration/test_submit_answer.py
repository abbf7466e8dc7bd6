"""A submission's answer is built as plain data, not through its model (for CPU;
broker/services/jobs.py, ``_fresh_answer``): its bytes must be exactly what the
model's own serialisation gives for the job as stored, and what ``GET`` answers
for it — for a plain job, a keyed one (and its replay), an array job, a script
whose directives set values (sources, notes), non-ASCII text and a small price."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session

from broker.models import Job
from broker.schemas import JobOut
from broker.services import jobs as job_service
from tests.support.env import BrokerEnv, broker_env


@pytest.fixture
def quiet_env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    """A broker whose tracker does not move the jobs this test submits."""
    with broker_env(tmp_path, db_url, run_tracker=False) as e:
        yield e


def _stored(env: BrokerEnv, job_id: str) -> JobOut:
    """The job as the model builds it from the ORM row (the reference)."""
    with Session(env.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job_service.job_out_loaded(session, job)


def test_submission_answers_are_the_models_json_of_the_stored_job(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    env.setup_project(amount=1000.0)
    alice = env.auth("alice")
    base = {"project": "EHPC-TEST-001", "cluster": "local", "script": "true", "time_limit_minutes": 1}
    bodies = {
        "plain": base,
        "unicode": {**base, "name": "ünïcode \"job\" ✓", "environment": {"GREETING": "grüß dich"}},
        "directives": {**base, "script": "#!/bin/sh\n#SBATCH --time=7\n#SBATCH --job-name=from-script\n"
                                         "#SBATCH --cpus-per-task=2\ntrue\n", "time_limit_minutes": None},
        "array": {**base, "array": "0-3%2"},
    }
    answers = {}
    for what, body in bodies.items():
        r = env.call("POST", "/v1/jobs", alice, json={k: v for k, v in body.items() if v is not None})
        assert r.status_code == 201, (what, r.text)
        answers[what] = r
    keyed = env.call("POST", "/v1/jobs", {**alice, "Idempotency-Key": "answer-1"}, json=base)
    assert keyed.status_code == 201, keyed.text
    answers["keyed"] = keyed
    for what, r in answers.items():
        job_id = r.json()["id"]
        stored = _stored(env, job_id)
        assert stored.state == "PENDING" and stored.scheduler_job_id is not None, what
        assert r.content == stored.model_dump_json().encode(), what
        got = env.call("GET", f"/v1/jobs/{job_id}", alice)
        assert got.status_code == 200 and got.content == r.content, what
        assert r.headers["content-type"] == "application/json"
    assert answers["array"].json()["array"]["tasks"] == 4
    assert answers["directives"].json()["request"]["sources"]["time_limit_minutes"] == "script:2"
    assert answers["plain"].json()["estimated_cost"]["amount"] == pytest.approx(1 / 60, abs=1e-6)
    replay = env.call("POST", "/v1/jobs", {**alice, "Idempotency-Key": "answer-1"}, json=base)
    assert replay.status_code == 201 and replay.headers.get("idempotent-replayed") == "true"
    assert replay.json() == keyed.json()
    # the service's answer, as its model, is the stored job too
    assert JobOut.model_validate(answers["plain"].json()) == _stored(env, answers["plain"].json()["id"])
