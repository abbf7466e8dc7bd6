"""Statements run on the driver's cursor (broker/direct.py) answer what SQLAlchemy's
execution answers — the same values after the types' processing (UTC timestamps,
JSON, dates, floats, NULLs) — and fail as SQLAlchemy's errors do. Both databases
(SQLite runs them through the session)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from broker.db import autocommit_connection, autocommit_session, classify, make_engine, session_scope
from broker.direct import Statement
from broker.models import Allocation, Cluster, Project, User
from tests.support.env import fresh_database

PROJECTS = Project.__table__  # type: ignore[attr-defined]
CLUSTERS = Cluster.__table__  # type: ignore[attr-defined]


def _seed(engine: sa.Engine) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    with session_scope(engine) as s:
        s.add(User(name="ünïcode", created_at=at))
        s.add(Project(code="P-1", title="t", status="active", access_mode="playground", start_date=date(2026, 1, 1),
                      attributes={"a": [1, 2.5, None, "x"]}, created_at=at))
        s.add(Cluster(name="c1", adapter="noop", connection={"k": "v"}, cost_model={"cpu": 1.5},
                      poll_interval_seconds=12.5, partitions=[{"name": "cpu"}], health_checked_at=at,
                      created_at=at))
        s.flush()
        project = s.execute(sa.select(PROJECTS.c.id)).scalar_one()
        cluster = s.execute(sa.select(CLUSTERS.c.id)).scalar_one()
        s.add(Allocation(project_id=project, cluster_id=cluster, unit="core_hours", granted=10, account="acc"))


STATEMENT = Statement(
    sa.select(PROJECTS.c.id, PROJECTS.c.code, PROJECTS.c.start_date, PROJECTS.c.end_date, PROJECTS.c.attributes,
              CLUSTERS.c.connection, CLUSTERS.c.poll_interval_seconds, CLUSTERS.c.health_checked_at,
              CLUSTERS.c.unreachable_since, CLUSTERS.c.health_ok, sa.literal("50%").label("pct"))
    .select_from(PROJECTS).join(CLUSTERS, CLUSTERS.c.name == sa.bindparam("cluster"))
    .where(PROJECTS.c.code == sa.bindparam("code"), PROJECTS.c.status == "active"))


def test_rows_are_what_sqlalchemy_reads(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        _seed(engine)
        params = {"code": "P-1", "cluster": "c1"}
        with session_scope(engine) as s:
            expected = [tuple(r) for r in s.execute(STATEMENT.clause, params).all()]
            got = STATEMENT.rows(s, params)
            again = STATEMENT.rows(s, params)  # result processors kept from the first answer
            none = STATEMENT.rows(s, {"code": "nope", "cluster": "c1"})
        assert got == expected == again, (got, expected)
        row = got[0]
        assert row[1:] == ("P-1", date(2026, 1, 1), None, {"a": [1, 2.5, None, "x"]}, {"k": "v"}, 12.5,
                           datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), None, None, "50%")
        assert none == []
    finally:
        engine.dispose()


def test_writes_with_returning_process_their_parameters(db_url: str) -> None:
    """JSON and UTC timestamp parameters go through the types' bind processing."""
    engine = make_engine(db_url)
    try:
        _seed(engine)
        at = datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
        update = Statement(sa.update(CLUSTERS).where(CLUSTERS.c.name == sa.bindparam("who"))
                           .values(partitions=sa.bindparam("parts", type_=CLUSTERS.c.partitions.type),
                                   unreachable_since=sa.bindparam("since", type_=CLUSTERS.c.unreachable_since.type))
                           .returning(CLUSTERS.c.partitions, CLUSTERS.c.unreachable_since))
        with session_scope(engine) as s:
            got = update.rows(s, {"who": "c1", "parts": [{"name": "gpu", "n": 2}], "since": at})
        assert got == [([{"name": "gpu", "n": 2}], at)]
        with engine.connect() as conn:
            stored = conn.execute(sa.select(CLUSTERS.c.unreachable_since)).scalar_one()
        assert stored == at
    finally:
        engine.dispose()


def test_errors_are_sqlalchemy_errors(db_url: str) -> None:
    """A constraint violation is answered like any other (classify: ``unique``), and
    the session can go on after a rollback."""
    engine = make_engine(db_url)
    try:
        _seed(engine)
        users = User.__table__  # type: ignore[attr-defined]
        insert = Statement(sa.insert(users).values(name=sa.bindparam("n"), created_at=sa.bindparam(
            "at", type_=users.c.created_at.type)).returning(users.c.id))
        with session_scope(engine) as s, pytest.raises(sa.exc.IntegrityError) as err:
            insert.rows(s, {"n": "ünïcode", "at": datetime.now(UTC)})
        fault = classify(err.value)
        assert fault is not None and fault.kind == "unique", fault
        with session_scope(engine) as s:
            assert len(insert.rows(s, {"n": "other", "at": datetime.now(UTC)})) == 1
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_lost_connection_is_invalidated_and_answered_as_unavailable(tmp_path: Path) -> None:
    """PostgreSQL: a connection the server ended is thrown away (not given back to the
    pool) and the error classifies as ``unavailable`` (503 database_unavailable)."""
    with fresh_database("postgresql", tmp_path, migrated=True) as url:
        engine = make_engine(url, pool_size=1)
        try:
            with autocommit_connection(engine) as conn:
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            killer = sa.create_engine(url, isolation_level="AUTOCOMMIT")
            with killer.connect() as k:
                k.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            killer.dispose()
            stmt = Statement(sa.select(sa.literal(1)))
            with autocommit_connection(engine) as conn, pytest.raises(sa.exc.DBAPIError) as err:
                stmt.run(conn, {})
            assert err.value.connection_invalidated
            fault = classify(err.value)
            assert fault is not None and fault.kind == "unavailable", fault
            with autocommit_connection(engine) as conn:  # a new connection, not the dead one
                assert stmt.run(conn, {}) == [(1,)]
                assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pid
        finally:
            engine.dispose()


@pytest.mark.postgres
def test_an_autocommit_connection_goes_back_to_the_pool_transactional(tmp_path: Path) -> None:
    """PostgreSQL: inside ``autocommit_connection`` each statement commits by itself
    (another connection sees it at once); the pooled connection comes back out of
    autocommit afterwards, after an error too, so a later Session runs transactions."""
    with fresh_database("postgresql", tmp_path, migrated=True) as url:
        engine = make_engine(url, pool_size=1)
        other = sa.create_engine(url)
        users = User.__table__  # type: ignore[attr-defined]
        insert = Statement(sa.insert(users).values(name=sa.bindparam("n"), created_at=sa.bindparam(
            "at", type_=users.c.created_at.type)).returning(users.c.id))
        try:
            with autocommit_connection(engine) as conn:
                insert.run(conn, {"n": "a", "at": datetime.now(UTC)})
                with other.connect() as o:  # committed already
                    assert o.execute(sa.select(sa.func.count()).select_from(users)).scalar_one() == 1
            with pytest.raises(sa.exc.IntegrityError), autocommit_connection(engine) as conn:
                insert.run(conn, {"n": "a", "at": datetime.now(UTC)})
            with session_scope(engine) as s:
                driver = s.connection().connection.driver_connection
                assert driver is not None and driver.autocommit is False
                s.execute(sa.insert(users).values(name="b", created_at=datetime.now(UTC)))
                with other.connect() as o:  # not yet: in a transaction
                    assert o.execute(sa.select(sa.func.count()).select_from(users)).scalar_one() == 1
        finally:
            other.dispose()
            engine.dispose()


@pytest.mark.postgres
def test_an_autocommit_session_runs_orm_work_and_direct_statements_on_one_connection(tmp_path: Path) -> None:
    """PostgreSQL: the reservation's Session (``autocommit_session``) — a row the ORM
    adds (a user's first sight) is flushed before a direct statement reads, on the
    same connection, and is kept when the block ends."""
    with fresh_database("postgresql", tmp_path, migrated=True) as url:
        engine = make_engine(url, pool_size=1)  # one connection: both must use it
        users = User.__table__  # type: ignore[attr-defined]
        names = Statement(sa.select(users.c.name).where(users.c.name.like(sa.bindparam("p"))))
        try:
            with autocommit_session(engine) as s:
                assert names.rows(s, {"p": "new%"}) == []
                s.add(User(name="newcomer", created_at=datetime.now(UTC)))
                assert names.rows(s, {"p": "new%"}) == [("newcomer",)]
            with engine.connect() as conn:
                assert conn.execute(sa.select(users.c.name)).scalars().all() == ["newcomer"]
        finally:
            engine.dispose()
