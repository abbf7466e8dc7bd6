"""How database errors become answers (broker/db.py classify → broker/api/problems.py)."""

from __future__ import annotations

import json
import sqlite3

import sqlalchemy as sa

from broker.api.problems import database_problem
from broker.db import classify


def _answer(exc: BaseException) -> tuple[int, str, str | None]:
    fault = classify(exc)
    assert fault is not None
    r = database_problem(fault)
    return r.status_code, json.loads(bytes(r.body))["code"], r.headers.get("retry-after")


def _wrap(cls: type[sa.exc.DBAPIError], orig: Exception, statement: str = "SELECT 1") -> sa.exc.DBAPIError:
    return cls(statement, (), orig)


def test_pool_timeout_is_503_overloaded() -> None:
    assert _answer(sa.exc.TimeoutError("QueuePool limit reached")) == (503, "overloaded", "2")


def test_sqlite_errors() -> None:
    assert _answer(_wrap(sa.exc.IntegrityError, sqlite3.IntegrityError("UNIQUE constraint failed: projects.code"),
                         "INSERT INTO projects ...")) == (409, "conflict", None)
    status, code, _ = _answer(_wrap(sa.exc.IntegrityError, sqlite3.IntegrityError("FOREIGN KEY constraint failed"),
                                    "DELETE FROM clusters WHERE clusters.id = ?"))
    assert (status, code) == (409, "conflict")
    fault = classify(_wrap(sa.exc.IntegrityError, sqlite3.IntegrityError("FOREIGN KEY constraint failed"),
                           "DELETE FROM clusters WHERE clusters.id = ?"))
    assert fault is not None and "allocations" in fault.detail and "imported_jobs" in fault.detail
    locked = classify(_wrap(sa.exc.OperationalError, sqlite3.OperationalError("database is locked")))
    assert locked is not None and locked.retryable
    assert _answer(_wrap(sa.exc.OperationalError, sqlite3.OperationalError("unable to open database file"))) == (
        503, "database_unavailable", "5")


def test_not_a_database_error() -> None:
    assert classify(ValueError("x")) is None
