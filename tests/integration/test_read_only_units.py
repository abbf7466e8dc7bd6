"""GET routes run as read-only units of work (broker/api/unit_of_work.py): on
PostgreSQL in autocommit, which saves the BEGIN and COMMIT round trips. A GET that
wrote would lose the atomicity of its writes there, so a write in one is refused —
on both databases, so that the embedded default catches it as well."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from broker.api.deps import SessionDep
from broker.api.unit_of_work import UnitOfWorkRoute, writes
from broker.db import ReadOnlyViolation, make_engine
from broker.migrate import upgrade
from broker.models import User


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    engine = make_engine(db_url)
    upgrade(engine)
    router = APIRouter(route_class=UnitOfWorkRoute)

    @router.get("/count")
    def count(session: SessionDep) -> int:
        return len(session.exec(select(User)).all())

    @router.get("/autocommit")
    def autocommit(session: SessionDep) -> bool:
        return bool(getattr(session.connection().connection.driver_connection, "autocommit", False))

    @router.post("/autocommit")
    def autocommit_post(session: SessionDep) -> bool:
        return bool(getattr(session.connection().connection.driver_connection, "autocommit", False))

    @router.get("/insert-core")
    def insert_core(session: SessionDep) -> None:
        session.execute(sa.insert(User.__table__).values(name="core"))  # type: ignore[attr-defined]

    @router.get("/insert-orm")
    def insert_orm(session: SessionDep) -> None:
        session.add(User(name="orm"))

    @router.get("/insert-marked")
    @writes
    def insert_marked(session: SessionDep) -> None:
        session.add(User(name="marked"))

    @router.post("/insert-orm")
    def insert_orm_post(session: SessionDep) -> None:
        session.add(User(name="posted"))

    app = FastAPI()
    app.state.engine = engine
    app.include_router(router)
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c
    engine.dispose()


def _names(client: TestClient) -> list[str]:
    with Session(client.app.state.engine) as s:  # type: ignore[attr-defined]
        return sorted(u.name for u in s.exec(select(User)).all())


def test_a_get_reads_and_a_get_that_writes_is_refused(client: TestClient, db_url: str) -> None:
    # PostgreSQL: a GET without BEGIN/COMMIT, a POST in a transaction (and the pooled
    # connection is given back in its usual mode)
    assert client.get("/autocommit").json() is db_url.startswith("postgresql")
    assert client.post("/autocommit").json() is False
    before = _names(client)
    assert client.get("/count").json() == len(before)
    for path in ("/insert-core", "/insert-orm"):
        with pytest.raises(ReadOnlyViolation):
            client.get(path)
    assert _names(client) == before  # nothing was written
    assert client.post("/insert-orm").status_code == 200  # other methods write as before
    assert _names(client) == sorted([*before, "posted"])
    assert client.get("/insert-marked").status_code == 200  # a GET marked as writing: a transaction
    assert _names(client) == sorted([*before, "marked", "posted"])
