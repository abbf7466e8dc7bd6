"""The request session (``SessionDep``) is a plain dependency: the endpoint's unit of
work (broker/api/unit_of_work.py) is what commits and closes it, so a route that
would get one without such a unit of work is refused when it is built."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from broker.api import problems
from broker.api.deps import SessionDep
from broker.api.unit_of_work import UnitOfWorkRoute, check_routes
from broker.db import make_engine
from broker.errors import Conflict
from broker.migrate import upgrade
from broker.models import User


@pytest.fixture
def app(db_url: str) -> Iterator[FastAPI]:
    engine = make_engine(db_url)
    upgrade(engine)
    router = APIRouter(route_class=UnitOfWorkRoute)

    @router.get("/users")
    def users(session: SessionDep) -> int:
        return len(session.exec(select(User)).all())

    @router.post("/users")
    def add(session: SessionDep) -> None:
        session.add(User(name="added"))

    @router.post("/refused")
    def refused(session: SessionDep) -> None:
        session.add(User(name="refused"))
        session.flush()
        raise Conflict("no")

    app = FastAPI()
    problems.install(app)
    app.state.engine = engine
    app.include_router(router)
    yield app
    engine.dispose()


def test_every_request_gives_its_connection_back(app: FastAPI) -> None:
    pool = app.state.engine.pool
    with TestClient(app) as client:
        for method, path, status in [("GET", "/users", 200), ("POST", "/users", 200), ("POST", "/refused", 409),
                                     ("GET", "/users", 200)]:
            assert client.request(method, path).status_code == status
            if isinstance(pool, sa.pool.QueuePool):
                assert pool.checkedout() == 0, (method, path)
    with Session(app.state.engine) as s:
        assert sorted(u.name for u in s.exec(select(User)).all()) == ["added"]  # committed; refused rolled back


def test_a_route_that_would_leave_its_session_open_is_refused() -> None:
    router = APIRouter(route_class=UnitOfWorkRoute)
    with pytest.raises(TypeError, match="sync endpoint"):
        @router.get("/async")
        async def on_the_loop(session: SessionDep) -> None:
            pass

    def through_another(session: SessionDep) -> int:
        return 1

    with pytest.raises(TypeError, match="sync endpoint"):
        @router.get("/indirect")
        def indirect(n: int = Depends(through_another)) -> int:
            return n

    def plain(session: SessionDep) -> None:
        pass

    with pytest.raises(TypeError, match="UnitOfWorkRoute"):
        check_routes([APIRoute("/plain", plain)])
    check_routes([APIRoute("/none", lambda: None)])  # no session: nothing to refuse
