"""The read routes answer with JSON built without their response models (for CPU):
the bytes must be exactly what the models' own serialisation gives, for objects
with every kind of value — None fields, datetimes with microseconds, money in
micro-units (tiny, zero, huge), nested JSON, an array job, non-ASCII text."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from sqlmodel import Session, col, select

from broker.auth import Principal
from broker.models import Allocation, Job, Project
from broker.schemas import JobOut, JobPage, ProjectOut
from broker.services import jobs as job_service
from broker.services import projects as project_service
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


def _projects_json(env: BrokerEnv, codes: list[str]) -> bytes:
    """The projects as their models build them from ORM rows (the reference)."""
    with Session(env.engine) as session:
        rows = session.exec(select(Project).where(col(Project.code).in_(codes)).order_by(col(Project.code))).all()
        return TypeAdapter(list[ProjectOut]).dump_json([project_service.project_out(session, p) for p in rows])


def test_project_list_is_the_models_json(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    env.setup_project("EHPC-TEST-001", members=("alice", "bob"), pi="carol")
    env.setup_project("EHPC-TEST-002", members=("zoe", "alice"), amount=1e12, unit="gpu_hours", account="proj-b")
    r = env.call("POST", "/v1/projects", env.qm, json={
        "code": "EHPC-TEST-000", "title": "Ünïcode \"title\" ✓", "status": "pending", "start_date": "2026-01-01",
        "end_date": "2027-12-31", "attributes": {"grant": "ERC-123", "nested": {"a": [1, 2.5, None, True]}}})
    assert r.status_code == 201, r.text
    with Session(env.engine) as session:  # values the API does not write: int thresholds, dates, tiny money
        alloc = session.exec(select(Allocation).order_by(col(Allocation.id))).first()
        assert alloc is not None
        alloc.thresholds, alloc.start_date, alloc.end_date = [50, 75.5, 100], date(2026, 3, 1), date(2026, 9, 30)
        alloc.charged, alloc.reserved = 1, 3
        session.add(alloc)
        session.commit()
    everything = ["EHPC-TEST-000", "EHPC-TEST-001", "EHPC-TEST-002"]
    for who, codes in ((env.auth("alice"), everything[1:]), (env.auth("carol"), everything[1:2]),
                       (env.auth("zoe"), everything[2:]), (env.auth("nobody"), []), (env.qm, everything)):
        r = env.call("GET", "/v1/projects", who)
        assert r.status_code == 200, r.text
        assert [p["code"] for p in r.json()] == codes
        assert r.content == _projects_json(env, codes)


def test_usage_statements_kept_are_bounded(quiet_env: BrokerEnv) -> None:
    """Every order of the group keys is its own cached statement: the cache is bounded
    (a caller cycling through them must not grow the process without limit), and a
    shape evicted and built again answers the same."""
    from itertools import permutations

    from broker.services import usage

    env = quiet_env
    env.setup_project()
    alice = env.auth("alice")
    first = env.call("GET", "/v1/projects/EHPC-TEST-001/usage?group_by=user,cluster", alice)
    assert first.status_code == 200, first.text
    shapes = [",".join(p) for n in (3, 4, 5) for p in permutations(usage.GROUP_KEYS, n)]
    assert len(shapes) > usage.USAGE_STATEMENTS_KEPT
    for shape in shapes:
        assert env.call("GET", f"/v1/projects/EHPC-TEST-001/usage?group_by={shape}", alice).status_code == 200
    assert usage._usage_statement.cache_info().currsize <= usage.USAGE_STATEMENTS_KEPT
    again = env.call("GET", "/v1/projects/EHPC-TEST-001/usage?group_by=user,cluster", alice)
    assert again.content == first.content
