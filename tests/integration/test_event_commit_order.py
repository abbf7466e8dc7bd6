"""Job event ids follow commit order on PostgreSQL without a lock held by the client
(migration 0016): a transaction that wrote an event but has not committed does not
hold up another one's event, and the ids of committed events grow in the order of
their commits — so a reader resuming "after id N" can never miss an event that
commits later with a smaller id.

SQLite is not concerned: its writers are serialised (``BEGIN IMMEDIATE``), so a
second writer cannot even start while the first is open; the ordering there is
covered by the stream tests (tests/integration/test_waiting_on_the_server.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from broker import events
from broker.api.streams import fetch_events, last_event_id
from tests.support.env import BrokerEnv, broker_env, fresh_database


@pytest.fixture
def pg_env(tmp_path: Path) -> Iterator[BrokerEnv]:
    with fresh_database("postgresql", tmp_path, migrated=True) as url, broker_env(tmp_path, url, run_tracker=False) as env:
        yield env


def _a_job(env: BrokerEnv) -> tuple[str, int, int]:
    env.setup_project()
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": "EHPC-TEST-001", "script": "#!/bin/sh\ntrue\n", "time_limit_minutes": 1})
    assert r.status_code == 201, r.text
    with env.engine.connect() as conn:
        project_id, user_id = conn.execute(sa.text("SELECT project_id, user_id FROM jobs WHERE id = :j"),
                                           {"j": r.json()["id"]}).one()
    return r.json()["id"], int(project_id), int(user_id)


def _write(session: Session, job: tuple[str, int, int], reason: str) -> None:
    job_id, project_id, user_id = job
    events.record(session, job_id=job_id, project_id=project_id, user_id=user_id, state="PENDING",
                  previous="PENDING", pending_reason=reason)
    events.flush(session)


def test_event_ids_follow_commit_order_and_an_open_writer_blocks_nobody(pg_env: BrokerEnv) -> None:
    job = _a_job(pg_env)
    before = last_event_id(pg_env.engine)
    first = Session(pg_env.engine)
    _write(first, job, "first-written")  # inserted, not committed: holds no event lock

    second_done = threading.Event()
    errors: list[BaseException] = []

    def second_writer() -> None:
        try:
            with Session(pg_env.engine) as s:
                # the old client-held lock would make this wait for `first`: fail fast instead
                s.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
                _write(s, job, "second-written")
                s.commit()
            second_done.set()
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=second_writer)
    t.start()
    t.join(15)
    assert not errors, errors
    assert second_done.is_set(), "the second writer waited for the first one's commit"

    seen = fetch_events(pg_env.engine, after=before, job_id=job[0])
    assert [e.pending_reason for e in seen] == ["second-written"]  # only what is committed
    first.commit()
    first.close()

    after = fetch_events(pg_env.engine, after=before, job_id=job[0])
    assert [e.pending_reason for e in after] == ["second-written", "first-written"]  # commit order
    assert all(e.id > before for e in after)
    # a reader that saw the second event resumes after it and still gets the first one
    assert [e.pending_reason for e in fetch_events(pg_env.engine, after=seen[0].id, job_id=job[0])] \
        == ["first-written"]
    assert last_event_id(pg_env.engine) == after[-1].id


def test_a_rolled_back_event_leaves_no_row_and_no_provisional_id_is_ever_committed(pg_env: BrokerEnv) -> None:
    job = _a_job(pg_env)
    with Session(pg_env.engine) as s:
        _write(s, job, "rolled-back")
        s.rollback()
    with Session(pg_env.engine) as s:
        _write(s, job, "a")
        _write(s, job, "b")  # two rows in one transaction: both numbered at the commit, in order
        s.commit()
    with pg_env.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, pending_reason FROM job_events WHERE job_id = :j ORDER BY id"),
                            {"j": job[0]}).all()
        negative = conn.execute(sa.text("SELECT count(*) FROM job_events WHERE id <= 0")).scalar_one()
    assert negative == 0
    assert [r for _, r in rows if r] == ["a", "b"]
    assert "rolled-back" not in [r for _, r in rows]


def test_a_row_restored_with_its_id_keeps_it(pg_env: BrokerEnv) -> None:
    """pg_restore / a data copy inserts explicit ids: the trigger leaves them alone."""
    job_id, project_id, user_id = _a_job(pg_env)
    with pg_env.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO job_events (id, job_id, project_id, user_id, state, occurred_at) "
            "VALUES (900000, :j, :p, :u, 'PENDING', now())"), {"j": job_id, "p": project_id, "u": user_id})
    with pg_env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM job_events WHERE id = 900000")).scalar_one() == 1
