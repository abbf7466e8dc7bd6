"""PostgreSQL: the submission path's statements run on the driver's cursor directly.

A statement run through SQLAlchemy (``Session.execute`` or ``Connection.execute``)
costs far more CPU than the statement itself: its cache key is generated on every
execution, an execution context and a result object are built, and psycopg builds
a description of every column of the answer (a Python object per column) for the
result's metadata — measured on the admission read (33 columns): ~190 µs through a
Session, ~110 µs through a Connection, ~35 µs on the cursor. A submission runs
three such statements.

:class:`Statement` compiles an SQLAlchemy statement once per dialect (the same
construct the other databases run) and runs it on the psycopg connection under the
caller's SQLAlchemy connection, with SQLAlchemy's own bind and result processing for
the column types (JSON, UTC timestamps…), and its errors raised as SQLAlchemy's
(:class:`sqlalchemy.exc.DBAPIError`, a lost connection invalidated), so the API
answers them as it answers every database error (broker/api/problems.py). Elsewhere
(SQLite) the statement runs through the session as usual.

Only statements that return rows are run this way (SELECT, or DML with RETURNING).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlmodel import Session

#: called with each statement's SQL before it is sent (tests watch what a request sends;
#: see tests/support/statements.py). Empty in production: costs one truth test.
OBSERVERS: list[Callable[[str], None]] = []


class _Compiled:
    """One statement compiled for one dialect: SQL text, constant bind values, bind
    processors; result processors once the first answer told the column types."""

    def __init__(self, clause: sa.Executable, dialect: Dialect) -> None:
        compiled = clause.compile(dialect=dialect)  # type: ignore[attr-defined]
        assert isinstance(compiled, SQLCompiler)
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ValueError("a directly run statement cannot have parameters rendered at execution "
                             "(expanding IN, literal_execute)")
        escaped = compiled.escaped_bind_names
        self.sql = compiled.string
        self.defaults = {escaped.get(name, name): bind.effective_value for name, bind in compiled.binds.items()
                         if not bind.required}
        self.renamed = dict(escaped)
        self.bind_processors = [
            (escaped.get(name, name), proc) for name, bind in compiled.binds.items()
            if (proc := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None]
        self.result_types = [entry[3] for entry in compiled._result_columns or ()]
        self.result_processors: list[tuple[int, Callable[[Any], Any]]] | None = None
        self.dialect = dialect

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        params = dict(self.defaults)
        if self.renamed:
            params.update((self.renamed.get(k, k), v) for k, v in values.items())
        else:
            params.update(values)
        for name, proc in self.bind_processors:
            if name in params:
                params[name] = proc(params[name])
        return params

    def processors(self, description: Sequence[Any]) -> list[tuple[int, Callable[[Any], Any]]]:
        found = self.result_processors
        if found is None:
            found = []
            for i, (type_, column) in enumerate(zip(self.result_types, description, strict=True)):
                proc: Callable[[Any], Any] | None = type_.dialect_impl(self.dialect).result_processor(
                    self.dialect, column.type_code)
                if proc is not None:
                    found.append((i, proc))
            self.result_processors = found
        return found


class Statement:
    """An SQLAlchemy statement returning rows, run on the driver's cursor on
    PostgreSQL (see the module docstring). Build it once (module level or cached):
    compiling is the expensive part."""

    def __init__(self, clause: sa.Executable) -> None:
        self.clause = clause
        # per dialect object, dropped with it (an id could be reused by another engine's)
        self._compiled: weakref.WeakKeyDictionary[Dialect, _Compiled] = weakref.WeakKeyDictionary()

    def rows(self, session: Session, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Every row of the answer, as tuples in the statement's column order. In
        ``session``'s transaction (or autocommit): its pending changes are flushed
        first, as SQLAlchemy's autoflush would."""
        session.flush()
        # a Session bound to a connection (broker.db.autocommit_session): that one,
        # without starting the Session's transaction
        bind = session.bind
        conn = bind if isinstance(bind, sa.Connection) else session.connection()
        if conn.dialect.name != "postgresql":
            return [tuple(row) for row in session.execute(self.clause, dict(values)).all()]
        return self.run(conn, values)

    def first(self, session: Session, values: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The first row of the answer, or None."""
        found = self.rows(session, values)
        return found[0] if found else None

    def run(self, conn: sa.Connection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run on ``conn``'s psycopg connection (PostgreSQL only)."""
        dialect = conn.dialect
        compiled = self._compiled.get(dialect)
        if compiled is None:
            compiled = self._compiled[dialect] = _Compiled(self.clause, dialect)
        params = compiled.params(values)
        for observe in OBSERVERS:
            observe(compiled.sql)
        driver = conn.connection.driver_connection
        assert driver is not None
        dbapi = dialect.loaded_dbapi
        try:
            with driver.cursor() as cursor:
                cursor.execute(compiled.sql, params)
                found = cursor.fetchall()
                procs = compiled.result_processors
                if procs is None:
                    procs = compiled.processors(cursor.description)
        except dbapi.Error as exc:
            invalidated = dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)
            if invalidated:
                conn.invalidate(exc)
            raise sa.exc.DBAPIError.instance(compiled.sql, params, exc, dbapi.Error,
                                             connection_invalidated=invalidated, dialect=dialect) from exc
        if not procs:
            return list(found)
        out = []
        for row in found:
            values_ = list(row)
            for i, proc in procs:
                values_[i] = proc(values_[i])
            out.append(tuple(values_))
        return out
