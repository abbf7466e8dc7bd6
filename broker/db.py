"""Engine and sessions. SQLite (embedded) and PostgreSQL (production).

SQLite note: SQLAlchemy drops ``FOR UPDATE`` there and pysqlite opens transactions
lazily, so two writers can deadlock on lock upgrade. Every SQLite transaction
therefore starts with ``BEGIN IMMEDIATE`` (the write lock is taken up front and
waits up to ``busy_timeout``), and the database runs in WAL mode so readers are
not blocked by the writer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel

SQLITE_BUSY_TIMEOUT_MS = 60_000


#: pool size when no settings are given (tests, tools); ``serve`` derives it from
#: ``worker_threads`` (broker/config.py, ``Settings.pool_size``). At least the default
#: settings' ``database_users`` (tests/unit/test_admission.py checks it)
DEFAULT_POOL_SIZE = 32
DEFAULT_POOL_TIMEOUT_SECONDS = 5.0
#: a connection attempt to an unreachable PostgreSQL gives up after this long, so an
#: outage becomes a prompt 503 rather than a hung worker thread
PG_CONNECT_TIMEOUT_SECONDS = 3


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the settings this broker relies on.

    The pool never overflows (``max_overflow=0``): its size is the number of threads
    that may use the database at once, so a checkout only waits when something holds
    a connection it should not (and then fails after ``pool_timeout``, a 503)."""
    kwargs.setdefault("pool_size", DEFAULT_POOL_SIZE)
    kwargs.setdefault("max_overflow", 0)
    kwargs.setdefault("pool_timeout", DEFAULT_POOL_TIMEOUT_SECONDS)
    if url.startswith("sqlite"):
        if ":memory:" in url or url.rstrip("/") in {"sqlite:", "sqlite+pysqlite:"}:
            for key in ("pool_size", "max_overflow", "pool_timeout"):
                kwargs.pop(key)
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    # a pooled connection idle for a while is checked before use (see _ping_when_idle);
    # one just given back is not: SQLAlchemy's pre-ping cost a round trip per checkout
    kwargs.setdefault("pool_pre_ping", False)
    # a silent network partition must not hang a thread on a pooled connection forever:
    # unacknowledged data and idle connections are given up on (libpq's TCP options)
    kwargs.setdefault("connect_args", {"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS,
                                       "tcp_user_timeout": 10_000, "keepalives": 1, "keepalives_idle": 30,
                                       "keepalives_interval": 10, "keepalives_count": 3})
    engine = sa.create_engine(url, **kwargs)
    if not kwargs["pool_pre_ping"]:
        _ping_when_idle(engine)
    return engine


#: a pooled PostgreSQL connection unused for longer than this is pinged before use
PING_AFTER_IDLE_SECONDS = 1.0
#: execution options of a connection in autocommit (PostgreSQL): no BEGIN/COMMIT round trips
AUTOCOMMIT: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"}
#: ``Session.info`` key marking a read-only unit of work's session
READ_ONLY_KEY = "aifa_read_only"


class ReadOnlyViolation(RuntimeError):
    """A write in a read-only unit of work: a GET route that writes (a bug: in
    autocommit, its writes would not be atomic)."""


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling, as SQLAlchemy's ``pool_pre_ping`` but only for
    a connection that sat in the pool for :data:`PING_AFTER_IDLE_SECONDS`: after a
    database restart or a network cut, the first checkout of each stale connection
    finds it dead and the pool replaces it; a connection given back a moment ago (all
    of them under load) costs no round trip. One that died within that moment fails
    its statement, which invalidates the whole pool (SQLAlchemy's disconnect rule)."""

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["aifa_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("aifa_idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DisconnectionError(f"pooled connection is dead: {exc}") from exc


@event.listens_for(Session, "do_orm_execute")
def _refuse_writes_when_read_only(state: Any) -> None:
    # a session-level check (one call per statement run through a Session): an engine
    # ``before_cursor_execute`` listener puts every statement of every connection on
    # SQLAlchemy's slower evented path (measured: +2 % instructions per GET)
    if state.session.info.get(READ_ONLY_KEY) and not state.is_select:
        raise ReadOnlyViolation(f"a read-only unit of work ran a write: {str(state.statement)[:80]!r}")


def refuse_pending_writes(session: Session) -> None:
    """Raise :class:`ReadOnlyViolation` if a read-only unit of work has objects to
    flush (ORM writes do not pass through ``do_orm_execute``)."""
    if session.new or session.dirty or session.deleted:
        raise ReadOnlyViolation("a read-only unit of work changed objects")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_engines: dict[str, Engine] = {}


def get_engine(url: str, **kwargs: Any) -> Engine:
    """One engine per URL per process (``kwargs`` apply when it is first made)."""
    if url not in _engines:
        _engines[url] = make_engine(url, **kwargs)
    return _engines[url]


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A unit of work: commits on success, rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def autocommit_connection(engine: Engine) -> Iterator[sa.Connection]:
    """A PostgreSQL connection in autocommit, no Session: for a caller whose work is
    single statements run directly (broker/direct.py). Its isolation level goes back
    to the default when it returns to the pool."""
    with engine.connect() as conn:
        if engine.dialect.driver != "psycopg":
            yield conn.execution_options(**AUTOCOMMIT)
            return
        # what isolation_level=AUTOCOMMIT does on psycopg, without SQLAlchemy's
        # characteristics machinery around it (setting and resetting the level was a
        # third of a checkout's CPU); the flag is put back before the pool sees it
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.autocommit = True
        try:
            yield conn
        finally:
            try:
                driver.autocommit = False
            except Exception:  # a broken connection: never back into the pool in autocommit
                conn.invalidate()


@contextmanager
def autocommit_session(engine: Engine) -> Iterator[Session]:
    """PostgreSQL: a Session bound to one :func:`autocommit_connection`, every
    statement its own transaction. Statements run directly (broker/direct.py) use
    that connection and never start the Session's own bookkeeping, which cost more
    CPU than such a statement (a checkout with isolation level, a transaction
    object, its commit and close); ORM work on a rarer path (a user's first sight)
    goes through the Session as usual and is committed at the end."""
    with autocommit_connection(engine) as conn, Session(bind=conn, expire_on_commit=False) as session:
        try:
            yield session
            if session.in_transaction():
                session.commit()
        except BaseException:
            session.rollback()
            raise


def insert_values(session: Session, model: type[SQLModel], values: dict[str, Any]) -> None:
    """INSERT one row of ``model``'s table from a plain mapping, as one Core statement
    in ``session``'s transaction. The hot paths use it instead of building a table
    model and flushing it through the unit of work, which costs several times more
    CPU. Keys whose value is None are not sent (the column is NULL)."""
    table: sa.Table = model.__table__  # type: ignore[attr-defined]
    session.execute(sa.insert(table), {k: v for k, v in values.items() if v is not None})


def dispose_engines() -> None:
    """Close every cached engine's pool (tests, CLI shutdown)."""
    for engine in list(_engines.values()):
        engine.dispose()
    _engines.clear()


# --- what a database error means for the caller ------------------------------------------

FaultKind = Literal["foreign_key", "unique", "integrity", "serialization", "unavailable",
                    "pool_exhausted", "data", "other"]

_PG_RETRYABLE = {"40001", "40P01"}  # serialization_failure, deadlock_detected
_PG_UNAVAILABLE_PREFIXES = ("08", "53", "57P")  # connection, resources, operator intervention
_SQLITE_BUSY = ("database is locked", "database table is locked")


@dataclass(frozen=True)
class DatabaseFault:
    """A database error classified for the API (see broker/api/problems.py)."""

    kind: FaultKind
    detail: str

    @property
    def retryable(self) -> bool:
        """Running the whole unit of work again may succeed (a lost race, not bad data)."""
        return self.kind == "serialization"


def classify(exc: BaseException) -> DatabaseFault | None:
    """What ``exc`` means, or None when it is not a database error."""
    if isinstance(exc, sa.exc.TimeoutError):
        return DatabaseFault("pool_exhausted", "No database connection became free in time.")
    if not isinstance(exc, sa.exc.DBAPIError):
        return None
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    message = str(orig).strip().splitlines()[0] if orig is not None else str(exc)
    if exc.connection_invalidated:
        return DatabaseFault("unavailable", "The connection to the database was lost.")
    if isinstance(sqlstate, str):
        return _classify_pg(exc, sqlstate, orig)
    if isinstance(exc, sa.exc.IntegrityError):
        return _classify_sqlite_integrity(exc, message)
    if isinstance(exc, sa.exc.OperationalError):
        if any(busy in message for busy in _SQLITE_BUSY):
            return DatabaseFault("serialization", "The database is busy with another write.")
        return DatabaseFault("unavailable", "The database cannot be reached.")
    if isinstance(exc, sa.exc.InterfaceError):
        return DatabaseFault("unavailable", "The database cannot be reached.")
    if isinstance(exc, sa.exc.DataError):
        return DatabaseFault("data", f"The database refused a value: {message[:200]}")
    return DatabaseFault("other", message[:200])


def _classify_pg(exc: sa.exc.DBAPIError, sqlstate: str, orig: Any) -> DatabaseFault:
    diag = getattr(orig, "diag", None)
    primary = getattr(diag, "message_primary", None) or ""
    detail = getattr(diag, "message_detail", None) or ""
    if sqlstate == "23503":
        referenced_by = re.search(r'referenced from table "([^"]+)"', detail)
        table = re.search(r'on table "([^"]+)"', primary)
        if referenced_by and table:
            return DatabaseFault("foreign_key", f"This {table.group(1)} record is still referenced by "
                                 f"{referenced_by.group(1)}; remove or move those first.")
        missing = re.search(r'not present in table "([^"]+)"', detail)
        return DatabaseFault("foreign_key", f"The {missing.group(1) if missing else 'record'} it refers to "
                             "does not exist (any more).")
    if sqlstate == "23505":
        key = re.search(r"Key \(([^)]*)\)=\((.*)\) already exists", detail)
        table_name = getattr(diag, "table_name", None) or "record"
        what = f" with {key.group(1)}={key.group(2)[:100]}" if key else ""
        return DatabaseFault("unique", f"A {table_name} record{what} already exists.")
    if sqlstate.startswith("23"):
        return DatabaseFault("integrity", f"The change breaks a database rule: {primary[:200]}")
    if sqlstate in _PG_RETRYABLE:
        return DatabaseFault("serialization", "A concurrent change got in the way.")
    if sqlstate.startswith(_PG_UNAVAILABLE_PREFIXES):
        return DatabaseFault("unavailable", "The database cannot take requests right now.")
    if sqlstate.startswith("22"):
        return DatabaseFault("data", f"The database refused a value: {primary[:200]}")
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return DatabaseFault("unavailable", "The database cannot be reached.")
    return DatabaseFault("other", primary[:200])


def _classify_sqlite_integrity(exc: sa.exc.DBAPIError, message: str) -> DatabaseFault:
    if "FOREIGN KEY" in message:
        deleted = re.match(r"\s*DELETE FROM (\w+)", exc.statement or "", re.IGNORECASE)
        if deleted:
            dependents = ", ".join(referencing_tables(deleted.group(1))) or "other records"
            return DatabaseFault("foreign_key", f"This {deleted.group(1)} record is still referenced "
                                 f"(by {dependents}); remove or move those first.")
        statement = (exc.statement or "").strip().upper()
        if not statement or statement.startswith("COMMIT"):  # deferred foreign keys
            return DatabaseFault("foreign_key", "The change would leave a reference dangling: a record is "
                                 "still referenced by another, or refers to one that does not exist.")
        return DatabaseFault("foreign_key", "A record it refers to does not exist (any more).")
    unique = re.search(r"UNIQUE constraint failed: (\w+)\.([\w., ]+)", message)
    if unique:
        columns = ", ".join(c.split(".")[-1] for c in unique.group(2).split(", "))
        return DatabaseFault("unique", f"A {unique.group(1)} record with this {columns} already exists.")
    return DatabaseFault("integrity", f"The change breaks a database rule: {message[:200]}")


def referencing_tables(table: str) -> list[str]:
    """Tables of the schema with a foreign key to ``table`` (names a blocked delete)."""
    from sqlmodel import SQLModel

    import broker.models  # noqa: F401 - registers the tables in the metadata

    return sorted({t.name for t in SQLModel.metadata.tables.values()
                   for fk in t.foreign_keys if fk.column.table.name == table and t.name != table})


def dependents(connection: sa.Connection, exc: sa.exc.DBAPIError) -> list[str]:
    """For a DELETE refused by a foreign key: the tables that really hold rows
    pointing at the deleted key (SQLite does not say; PostgreSQL does)."""
    deleted = re.match(r"\s*DELETE FROM (\w+) WHERE \w+\.(\w+) = \?", exc.statement or "", re.IGNORECASE)
    params = exc.params
    if not deleted or not isinstance(params, tuple | list) or len(params) != 1:
        return []
    from sqlmodel import SQLModel

    import broker.models  # noqa: F401 - registers the tables in the metadata

    found = []
    for t in SQLModel.metadata.tables.values():
        for fk in t.foreign_keys:
            if fk.column.table.name == deleted.group(1) and fk.column.name == deleted.group(2):
                hit = connection.execute(sa.select(sa.literal(1)).select_from(t)
                                         .where(fk.parent == params[0]).limit(1)).first()
                if hit:
                    found.append(t.name)
    return sorted(set(found))
