"""Shared fixtures: ``db_url`` runs every DB test on SQLite AND PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.env import BrokerEnv, broker_env, fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new database at the newest schema revision (a copy of a migrated template)."""
    with fresh_database(request.param, tmp_path, migrated=True) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty database: for the tests of the migrations themselves."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    with broker_env(tmp_path, db_url) as e:
        yield e


_CLUSTER_DOWN_WORDS = ("not healthy", "not running", "never brought up", "make slurm-up", "not (fully) up")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI (``AIFA_REQUIRE_SLURM=1``) a Slurm test skipped because its dev cluster
    is missing or unhealthy is a failure, never a silent skip."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("AIFA_REQUIRE_SLURM") != "1" or not item.get_closest_marker("slurm"):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(word in reason for word in _CLUSTER_DOWN_WORDS):
        report.outcome = "failed"
        report.longrepr = f"required Slurm cluster unavailable: {reason}"
