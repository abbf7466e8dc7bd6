"""The schema comes only from migrations: upgrading an empty database gives exactly
the models' tables, on SQLite and PostgreSQL; downgrade works too. The tests' migrated
databases (copies of a template, tests/support/env.py) are what a migration leaves."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import broker.models  # noqa: F401
from broker.db import make_engine
from broker.migrate import alembic_config, is_up_to_date, upgrade


def test_migrations_match_models_and_downgrade(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
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


def test_the_tests_migrated_database_is_what_a_fresh_migration_leaves(db_url: str) -> None:
    engine = make_engine(db_url)
    assert is_up_to_date(engine)
    assert upgrade(engine) is False  # nothing left to apply
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
        tables = sa.inspect(conn).get_table_names()
        rows = {t: conn.execute(sa.text(f'SELECT COUNT(*) FROM "{t}"')).scalar() for t in tables}
    assert rows.pop("alembic_version") == 1
    assert set(rows.values()) == {0}, rows  # no data: the broker's start-up adds the local cluster
    engine.dispose()


def test_0018_stores_account_names_in_lower_case(empty_db_url: str) -> None:
    """Allocations written before 0018 keep the case a quota manager typed; Slurm folds
    it, so 0018 lower-cases them (and the jobs carrying them) and leaves the rest."""
    from sqlmodel import Session

    from broker.models import Allocation, Cluster, Project

    engine = make_engine(empty_db_url)
    upgrade(engine)
    with Session(engine) as s:
        cluster, project = Cluster(name="c1", adapter="local"), Project(code="P1", title="p")
        s.add_all([cluster, project])
        s.flush()
        assert cluster.id is not None and project.id is not None
        for account in ("EHPC-Mixed_01", "already-lower"):
            s.add(Allocation(project_id=project.id, cluster_id=cluster.id, unit="core_hours", account=account))
        s.commit()
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0017")
    upgrade(engine)
    with engine.connect() as conn:
        accounts = sorted(a for (a,) in conn.execute(sa.text("SELECT account FROM allocations")))
    assert accounts == ["already-lower", "ehpc-mixed_01"]
    engine.dispose()
