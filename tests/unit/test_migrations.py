"""The schema comes only from migrations: upgrading an empty database gives exactly
the models' tables, on SQLite and PostgreSQL; downgrade works too."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import broker.models  # noqa: F401
from broker.db import make_engine
from broker.migrate import alembic_config, is_up_to_date, upgrade


def test_migrations_match_models_and_downgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    assert not is_up_to_date(engine)
    upgrade(engine)
    assert is_up_to_date(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert not is_up_to_date(engine)
    upgrade(engine)
    assert is_up_to_date(engine)
    engine.dispose()
