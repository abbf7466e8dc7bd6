"""Schema migrations (Alembic), run programmatically: ``aifa-broker db upgrade``."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: PostgreSQL advisory lock serialising migrations of replicas that start together
MIGRATION_LOCK_KEY = zlib.crc32(b"aifa:migrations")


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> bool:
    """Bring the database to ``revision``; True if this call applied a migration.

    On PostgreSQL the whole upgrade runs under a transaction-scoped advisory lock:
    replicas (or a migration Job and a replica) that start together queue on it,
    and each one after the first finds the schema current and applies nothing."""
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        before = set(MigrationContext.configure(conn).get_current_heads())
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = set(MigrationContext.configure(conn).get_current_heads())
    if before != after:
        log.info("database schema migrated from %s to %s", ",".join(sorted(before)) or "empty",
                 ",".join(sorted(after)))
        return True
    return False


def is_up_to_date(engine: Engine) -> bool:
    """True when the database is at the newest revision (readiness check)."""
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads
