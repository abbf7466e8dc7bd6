"""One unit of work per request, committed before the answer is sent.

Routers are built with ``route_class=UnitOfWorkRoute``. Their sync endpoints are
wrapped (as async endpoints handing the work to a worker thread themselves,
broker/api/threads.py) so that, inside the one worker thread that runs the endpoint, the request's
session (``SessionDep``) is used, committed and closed — its connection goes back
to the pool before the thread is released and before any response byte is sent:

* a 2xx answer always means the change is committed (a failed commit becomes the
  problem answer of broker/api/problems.py instead);
* no request holds a connection while it waits for a thread, so threads and pool
  cannot deadlock (the pool is sized to the worker threads, see broker/config.py);
* a serialization failure (a lost race, PostgreSQL 40001/40P01 or SQLite busy)
  reruns the endpoint, at most ``RETRIES`` times, when the endpoint touches only the
  database (no engine, no adapter: nothing outside the transaction to repeat).
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from fastapi.routing import APIRoute
from sqlmodel import Session
from starlette.routing import BaseRoute

from broker.api.deps import OUTSIDE_TRANSACTION, REQUEST_SESSION
from broker.api.threads import run_in_worker
from broker.db import READ_ONLY_KEY, autocommit_connection, classify, dependents, refuse_pending_writes
from broker.errors import Conflict

log = logging.getLogger(__name__)

RETRIES = 3
#: routes answering these methods only read (see :func:`unit_of_work`)
READ_METHODS = frozenset({"GET", "HEAD"})
WRITES = "_aifa_writes"


class UnitOfWorkRoute(APIRoute):
    """An API route whose request session commits inside the endpoint's thread."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        methods = {m.upper() for m in kwargs.get("methods") or ()}
        read_only = bool(methods) and methods <= READ_METHODS and not getattr(endpoint, WRITES, False)
        wrapped = unit_of_work(endpoint, read_only=read_only)
        super().__init__(path, wrapped, **kwargs)
        calls = _dependency_calls(self.dependant)
        if REQUEST_SESSION in calls and (wrapped is endpoint or REQUEST_SESSION not in {
                d.call for d in self.dependant.dependencies}):
            raise TypeError(f"{path}: the request session (SessionDep) must be a parameter of the sync "
                            "endpoint itself, whose unit of work closes it")
        if wrapped is not endpoint:
            wrapped.retry_ok = not (calls & set(OUTSIDE_TRANSACTION))  # type: ignore[attr-defined]


def check_routes(routes: Iterable[BaseRoute]) -> None:
    """Refuse an API route that takes the request session (``SessionDep``) but is not a
    :class:`UnitOfWorkRoute`: nothing would commit or close its session."""
    for route in routes:
        if isinstance(route, APIRoute) and not isinstance(route, UnitOfWorkRoute) \
                and REQUEST_SESSION in _dependency_calls(route.dependant):
            raise TypeError(f"{route.path}: the request session (SessionDep) is only for routes of "
                            "route_class=UnitOfWorkRoute")


def writes(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a GET endpoint that writes (e.g. a live probe that records what it found):
    it runs in a transaction like the other methods, not as a read-only unit of work."""
    setattr(endpoint, WRITES, True)
    return endpoint


def _dependency_calls(dependant: Any) -> set[Callable[..., Any]]:
    calls = set()
    for sub in dependant.dependencies:
        if sub.call is not None:
            calls.add(sub.call)
        calls |= _dependency_calls(sub)
    return calls


def unit_of_work(endpoint: Callable[..., Any], *, read_only: bool = False) -> Callable[..., Any]:
    """``endpoint`` run as one unit of work (async endpoints are returned as they are:
    they must not use the request session).

    ``read_only`` (the GET routes): on PostgreSQL the session's connection runs in
    autocommit (:func:`broker.db.autocommit_connection`), which saves the ``BEGIN`` and ``COMMIT``
    round trips of every read and changes nothing it sees — at READ COMMITTED, the
    broker's level, each statement takes its own snapshot inside a transaction too.
    A write on such a connection is refused (broker.db), so a GET cannot lose the
    atomicity of a transaction without a test noticing."""
    if inspect.iscoroutinefunction(endpoint):
        return endpoint

    @functools.wraps(endpoint)
    async def in_worker(**kwargs: Any) -> Any:
        # FastAPI awaits this on the event loop; the endpoint runs in a worker thread
        return await run_in_worker(run, kwargs)

    def run(**kwargs: Any) -> Any:
        session = next((v for v in kwargs.values() if isinstance(v, Session)), None)
        if session is None:
            return endpoint(**kwargs)
        session.info["unit_of_work"] = True
        if not read_only:
            return _run(session, kwargs)
        session.info[READ_ONLY_KEY] = True
        engine = session.get_bind()
        if engine.dialect.name != "postgresql" or not isinstance(engine, sa.Engine):
            return _run(session, kwargs)
        # autocommit set on the driver's connection (broker.db.autocommit_connection),
        # not as SQLAlchemy's isolation level, whose set and reset around each checkout
        # cost more CPU than a job's read
        with autocommit_connection(engine) as conn:
            session.bind = conn
            return _run(session, kwargs)

    def _run(session: Session, kwargs: dict[str, Any]) -> Any:
        try:
            for attempt in range(1, RETRIES + 1):
                try:
                    result = endpoint(**kwargs)
                    if read_only:
                        refuse_pending_writes(session)
                    session.commit()
                    return result
                except sa.exc.DBAPIError as exc:
                    session.rollback()
                    fault = classify(exc)
                    if fault is not None and fault.retryable and attempt < RETRIES \
                            and getattr(in_worker, "retry_ok", False):
                        log.info("%s: %s; running it again (attempt %d)", endpoint.__name__, fault.detail,
                                 attempt + 1)
                        time.sleep(random.uniform(0.01, 0.05) * attempt)  # noqa: S311 - jitter
                        continue
                    if fault is not None and fault.kind == "foreign_key" and isinstance(exc, sa.exc.IntegrityError):
                        _name_dependents(session, exc)
                    raise
                except BaseException:
                    session.rollback()
                    raise
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            session.close()  # the connection goes back to the pool in this thread

    return in_worker


def _name_dependents(session: Session, exc: sa.exc.IntegrityError) -> None:
    """A delete refused by a foreign key: name the tables whose rows still point at
    it (SQLite does not say which; PostgreSQL's own message is kept)."""
    if session.get_bind().dialect.name != "sqlite":
        return
    try:
        found = dependents(session.connection(), exc)
    except sa.exc.SQLAlchemyError:
        return
    finally:
        session.rollback()
    if found:
        raise Conflict(f"It is still referenced by {', '.join(found)}; remove or move those first.",
                       depends=found) from exc
