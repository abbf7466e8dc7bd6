"""Shared fixtures: ``db_url`` runs every DB test on SQLite AND PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.env import BrokerEnv, broker_env, fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    with broker_env(tmp_path, db_url) as e:
        yield e
