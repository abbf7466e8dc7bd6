"""A broker under test: real database (SQLite file or a fresh PostgreSQL database),
real app, real local adapter, real tracker thread. Used by unit/integration/e2e."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from broker.api.app import create_app
from broker.auth import issue_token
from broker.config import Settings
from broker.db import make_engine
from broker.migrate import MIGRATIONS_DIR, upgrade

PG_ADMIN_URL = os.environ.get("AIFA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def postgres_available() -> str | None:
    """None when PostgreSQL answers, else the reason it cannot be used."""
    try:
        eng = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        eng.dispose()
    except Exception as exc:  # any failure means: skip with the reason
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {type(exc).__name__}"
    return None


@contextmanager
def fresh_database(kind: str, tmp_path: Path, *, migrated: bool = False) -> Iterator[str]:
    """A URL to a new database of ``kind`` (sqlite/postgresql), dropped afterwards.

    Empty, or with ``migrated`` a copy of a database that ``upgrade`` brought to the
    newest revision (what a broker's first start leaves behind, before it registers
    the local cluster). Migrating costs 0.2–0.5 s per database and most tests do not
    test migrations: copying a template migrated once is much cheaper. A migrated
    PostgreSQL database may instead be emptied and kept for a later test of this
    process (see "recycled PostgreSQL databases" below): to the test, the same."""
    if kind == "sqlite":
        path = tmp_path / "broker.sqlite3"
        if migrated:
            shutil.copyfile(_sqlite_template(), path)
        yield f"sqlite:///{path}"
        return
    reason = postgres_available()
    if reason:
        if os.environ.get("AIFA_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    name = _new_pg_name()
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        if migrated:
            _migrated_pg_database(admin, name)
        else:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield _pg_url(name)
    finally:
        from broker.db import dispose_engines

        dispose_engines()
        if not (migrated and _recycle_pg_database(admin, name)):
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- migrated templates ---------------------------------------------------------------------
# PostgreSQL: one template database per schema version, shared by the test processes that
# run at once (scripts/test.sh starts five) and by later runs; built on demand by the first
# process that needs it (a clean CI machine has none). SQLite: one file per process.

PG_TEMPLATE_PREFIX = "aifa_tpl_"
#: where a template is migrated before it is renamed to its final name: a template with
#: the final name is always complete, whatever happened to the process that built it
PG_TEMPLATE_BUILD_PREFIX = "aifa_tplbuild_"
#: session-level advisory lock held while a process looks for, builds or drops templates
PG_TEMPLATE_LOCK_KEY = zlib.crc32(b"aifa:test-template")
#: another schema version's template unused for this long is dropped. Not at once: other
#: checkouts on this machine (worktrees, another branch's run) may be using theirs now.
PG_TEMPLATE_STALE_SECONDS = 24 * 3600

_templates: dict[str, str] = {}  # kind → this process's template (PG database name / SQLite file)


def _pg_url(database: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"


def schema_key() -> str:
    """A digest of what a freshly migrated database depends on: the migration scripts
    (and Alembic's environment) and the versions of the tools that run them."""
    import alembic

    digest = hashlib.sha256(f"alembic {alembic.__version__} sqlalchemy {sa.__version__}".encode())
    for script in sorted(MIGRATIONS_DIR.rglob("*.py")):
        digest.update(script.relative_to(MIGRATIONS_DIR).as_posix().encode() + b"\0")
        digest.update(script.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def _sqlite_template() -> Path:
    """This process's migrated SQLite file (built on first use, removed at exit)."""
    if "sqlite" not in _templates:
        directory = Path(tempfile.mkdtemp(prefix="aifa-sqlite-template-"))
        atexit.register(shutil.rmtree, directory, True)
        path = directory / "template.sqlite3"
        engine = make_engine(f"sqlite:///{path}")
        upgrade(engine)
        engine.dispose()  # the last connection checkpoints the WAL: the file alone is the database
        _templates["sqlite"] = str(path)
    return Path(_templates["sqlite"])


# --- recycled PostgreSQL databases --------------------------------------------------------------
# Creating a database from the template and dropping it costs ~0.5 s per test (and on
# PostgreSQL 15 each DROP DATABASE forces a checkpoint that the other test processes
# wait for too). A used database is instead emptied and kept for the process's next
# test, when that provably gives what a new copy would: its schema is the template's
# (a digest of the catalogue: tables, columns, defaults, constraints, indexes, sequences,
# functions, triggers, types, grants, settings), every table is emptied and every
# sequence restarted. Anything else — a test changed the schema (a trigger, a deferrable
# constraint, a new sequence), no superuser — and it is dropped as before. The database
# is renamed the moment its test ends: a thread a test left behind cannot reach the next
# test's database (its reconnects fail as they would after the drop).

#: used databases kept per process (a test uses one, seldom two)
PG_SPARES = 2
#: a database that held more rows than this is dropped, not recycled: the dead rows
#: would slow the next tests' scans until autovacuum gets round to them
PG_RECYCLE_MAX_ROWS = 5000
_pg_spares: list[str] = []
#: the catalogue digest and the alembic revision of a new copy of the template, per process
_pg_fresh: dict[str, str] = {}

PG_SCHEMA_DIGEST = """
SELECT md5(string_agg(x, E'\\n' ORDER BY x)) FROM (
  SELECT concat_ws(' ', 'n', nspname, nspacl) AS x FROM pg_namespace
    WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
  UNION ALL SELECT concat_ws(' ', 'c', c.oid::regclass, c.relkind, c.relpersistence, c.relacl, c.reloptions,
      c.relrowsecurity, c.relreplident)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  UNION ALL SELECT concat_ws(' ', 'a', a.attrelid::regclass, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
      a.attnotnull, a.attidentity, a.attgenerated, a.attcollation, pg_get_expr(d.adbin, d.adrelid))
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL SELECT concat_ws(' ', 'k', conrelid::regclass, contypid::regtype, conname, pg_get_constraintdef(oid))
    FROM pg_constraint WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  UNION ALL SELECT concat_ws(' ', 'i', schemaname, indexdef) FROM pg_indexes
    WHERE schemaname NOT LIKE 'pg\\_%' AND schemaname <> 'information_schema'
  UNION ALL SELECT concat_ws(' ', 'q', schemaname, sequencename, data_type, start_value, increment_by, max_value,
      cycle, cache_size) FROM pg_sequences
  UNION ALL SELECT concat_ws(' ', 'f', p.oid::regprocedure, md5(p.prosrc)) FROM pg_proc p
    WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  UNION ALL SELECT concat_ws(' ', 't', tgrelid::regclass, tgname, tgenabled) FROM pg_trigger WHERE NOT tgisinternal
  UNION ALL SELECT concat_ws(' ', 'e', evtname) FROM pg_event_trigger
  UNION ALL SELECT concat_ws(' ', 'r', ev_class::regclass, rulename) FROM pg_rewrite
    WHERE ev_class >= 16384 AND rulename <> '_RETURN'
  UNION ALL SELECT concat_ws(' ', 'p', polrelid::regclass, polname) FROM pg_policy
  UNION ALL SELECT concat_ws(' ', 'y', t.typnamespace::regnamespace, t.typname, t.typtype) FROM pg_type t
    WHERE t.oid >= 16384 AND t.typrelid = 0 AND t.typelem = 0
  UNION ALL SELECT concat_ws(' ', 'v', enumtypid::regtype, enumsortorder, enumlabel) FROM pg_enum
  UNION ALL SELECT concat_ws(' ', 'x', extname, extversion) FROM pg_extension
  UNION ALL SELECT concat_ws(' ', 'o', count(*)) FROM pg_largeobject_metadata
  UNION ALL SELECT concat_ws(' ', 's', setrole, setconfig) FROM pg_db_role_setting
    WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
) schema
"""


def _new_pg_name() -> str:
    return f"aifa_test_{uuid.uuid4().hex[:12]}"


def _pg_fresh_state(conn: sa.Connection) -> tuple[str, str]:
    """The catalogue digest and the alembic revision(s) of the database ``conn`` is on."""
    digest = conn.execute(sa.text(PG_SCHEMA_DIGEST)).scalar_one()
    revisions = ",".join(sorted(v for (v,) in conn.execute(sa.text("SELECT version_num FROM alembic_version"))))
    return str(digest), revisions


def _migrated_pg_database(admin: Engine, name: str) -> None:
    """Create database ``name`` at the newest revision: a recycled one, else a new copy."""
    while _pg_spares:
        spare = _pg_spares.pop()
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'ALTER DATABASE "{spare}" RENAME TO "{name}"'))
            return
        except sa.exc.DBAPIError:  # gone, say: a new copy then
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{spare}" WITH (FORCE)'))
    _clone_pg_template(admin, name)
    if not _pg_fresh:
        engine = sa.create_engine(_pg_url(name), poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            _pg_fresh["digest"], _pg_fresh["revisions"] = _pg_fresh_state(conn)
        engine.dispose()


def _recycle_pg_database(admin: Engine, name: str) -> bool:
    """Keep the used migrated database ``name`` for a later test, emptied, if that gives
    what a new copy would; True when ``name`` is gone (kept under another name, or dropped)."""
    if len(_pg_spares) >= PG_SPARES or not _pg_fresh:
        return False
    spare = _new_pg_name()
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": name})
            conn.execute(sa.text(f'ALTER DATABASE "{name}" RENAME TO "{spare}"'))
    except sa.exc.DBAPIError:  # still in use after the wait ALTER DATABASE allows: drop it
        return False
    engine = sa.create_engine(_pg_url(spare), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            if _pg_fresh_state(conn) != (_pg_fresh["digest"], _pg_fresh["revisions"]):
                raise LookupError("the schema is not the template's")
            # no foreign key order needed: the constraint triggers are off for this transaction
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
            tables = conn.execute(sa.text(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') "
                "AND (schemaname, tablename) <> ('public', 'alembic_version')")).scalars().all()
            deleted = sum(conn.execute(sa.text(f"DELETE FROM {table}")).rowcount for table in tables)
            if deleted > PG_RECYCLE_MAX_ROWS:
                raise LookupError("too many dead rows")
            for seq in conn.execute(sa.text("SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences "
                                            "WHERE last_value IS NOT NULL")).scalars().all():
                conn.execute(sa.text(f"ALTER SEQUENCE {seq} RESTART"))
        _pg_spares.append(spare)
    except (sa.exc.DBAPIError, LookupError):  # changed schema, or no superuser: a new copy next time
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{spare}" WITH (FORCE)'))
    finally:
        engine.dispose()
    return True


@atexit.register
def _drop_pg_spares() -> None:
    if not _pg_spares:
        return
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for spare in _pg_spares:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{spare}" WITH (FORCE)'))
    admin.dispose()
    _pg_spares.clear()


def _clone_pg_template(admin: Engine, name: str) -> None:
    """Create database ``name`` as a copy of the migrated template."""
    for attempt in (1, 2):
        if "postgresql" not in _templates:
            _templates["postgresql"] = _ensure_pg_template(admin)
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{_templates["postgresql"]}"'))
            return
        except sa.exc.ProgrammingError as exc:
            # dropped since this process found it (by hand, say): build it again, once
            if attempt == 2 or getattr(exc.orig, "sqlstate", None) != "3D000":
                raise
            del _templates["postgresql"]


def _ensure_pg_template(admin: Engine) -> str:
    """The name of the migrated template database of this schema version, built if missing.

    Under an advisory lock: concurrent test processes wait for the one that builds it.
    The template accepts no connections (``CREATE DATABASE … TEMPLATE`` refuses a source
    anyone is connected to). Its comment records when a test run last used it."""
    key = schema_key()
    name = PG_TEMPLATE_PREFIX + key
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": PG_TEMPLATE_LOCK_KEY})
        try:
            found: dict[str, str | None] = {row[0]: row[1] for row in conn.execute(sa.text(
                "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
                "WHERE datname LIKE 'aifa\\_tpl%'"))}
            for other, comment in found.items():
                if other.startswith(PG_TEMPLATE_BUILD_PREFIX):  # left by a process that died building it
                    conn.execute(sa.text(f'DROP DATABASE "{other}" WITH (FORCE)'))
                elif other != name and _template_unused_since(comment) < time.time() - PG_TEMPLATE_STALE_SECONDS:
                    conn.execute(sa.text(f'ALTER DATABASE "{other}" IS_TEMPLATE false'))
                    conn.execute(sa.text(f'DROP DATABASE "{other}"'))
            if name not in found:
                build = PG_TEMPLATE_BUILD_PREFIX + key
                conn.execute(sa.text(f'CREATE DATABASE "{build}"'))
                engine = make_engine(_pg_url(build))
                upgrade(engine)
                engine.dispose()
                conn.execute(sa.text(f'ALTER DATABASE "{build}" RENAME TO "{name}"'))
                conn.execute(sa.text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false IS_TEMPLATE true'))
            conn.execute(sa.text(f"COMMENT ON DATABASE \"{name}\" IS 'aifa-broker test template, last used "
                                 f"{int(time.time())}'"))
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PG_TEMPLATE_LOCK_KEY})
    return name


def _template_unused_since(comment: str | None) -> float:
    """The time a template's comment says it was last used (0 when it says nothing)."""
    word = (comment or "").rsplit(" ", 1)[-1]
    return float(word) if word.isdigit() else 0.0


@dataclass
class BrokerEnv:
    """One broker instance under test and helpers to drive it."""

    settings: Settings
    engine: Engine
    app: FastAPI
    client: TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, sub: str, *roles: str) -> str:
        key = f"{sub}:{','.join(sorted(roles))}"
        if key not in self.tokens:
            self.tokens[key] = issue_token(self.settings, sub=sub, roles=list(roles))
        return self.tokens[key]

    def auth(self, sub: str, *roles: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub, *roles)}"}

    @property
    def qm(self) -> dict[str, str]:
        return self.auth("qm", "quota_manager", "sysadmin")

    def call(self, method: str, path: str, who: dict[str, str] | None = None, **kw: Any) -> Any:
        return self.client.request(method, path, headers={**(who or {}), **kw.pop("headers", {})}, **kw)

    def setup_project(self, code: str = "EHPC-TEST-001", *, amount: float = 100.0, unit: str = "core_hours",
                      members: tuple[str, ...] = ("alice",), pi: str | None = None, cluster: str = "local",
                      account: str = "proj-a", access_mode: str = "playground",
                      map_accounts: bool = True) -> dict[str, Any]:
        """Project + allocation + members + cluster accounts, all through the API."""
        r = self.call("POST", "/v1/projects", self.qm, json={
            "code": code, "title": f"Test {code}", "status": "active", "access_mode": access_mode})
        assert r.status_code == 201, r.text
        r = self.call("POST", f"/v1/projects/{code}/allocations", self.qm, json={
            "cluster": cluster, "unit": unit, "amount": amount, "account": account})
        assert r.status_code == 201, r.text
        alloc = r.json()
        for user in (*members, *((pi,) if pi else ())):
            role = "pi" if user == pi else "member"
            r = self.call("POST", f"/v1/projects/{code}/members", self.qm, json={"user": user, "role": role})
            assert r.status_code == 201, r.text
            if map_accounts:
                r = self.call("PUT", f"/v1/clusters/{cluster}/accounts/{user}", self.qm,
                              json={"username": user})
                assert r.status_code == 200, r.text
        return alloc

    def job(self, job_id: str, who: dict[str, str]) -> dict[str, Any]:
        r = self.call("GET", f"/v1/jobs/{job_id}", who)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_job(self, job_id: str, who: dict[str, str], pred: Callable[[dict[str, Any]], bool],
                 timeout: float = 30.0) -> dict[str, Any]:
        """Poll the API until ``pred(job)`` holds (the tracker thread moves the job)."""
        deadline = time.monotonic() + timeout
        job = self.job(job_id, who)
        while not pred(job):
            if time.monotonic() > deadline:
                raise AssertionError(f"job never reached the expected state: {job}")
            time.sleep(0.1)
            job = self.job(job_id, who)
        return job

    def wait_settled(self, job_id: str, who: dict[str, str], timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_job(job_id, who, lambda j: j["charged"] is not None, timeout)


LOCAL_TEST_CONNECTION = {
    "time_scale": 1, "kill_grace_seconds": 0.5,
    "partitions": [{"name": "cpu", "cpus": 16, "memory_mb": 65536, "default": True},
                   {"name": "gpu", "cpus": 16, "gpus": 4, "memory_mb": 65536}],
}


def make_settings(tmp_path: Path, db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path / "data", database_url=db_url, run_tracker=True,
        tracker_interval_seconds=0.1, local_cluster_poll_seconds=0.2, reconcile_grace_seconds=1.0,
        reconcile_absent_seconds=3.0, reconcile_interval_seconds=0.5,
        # the concurrency tests send up to ~200 requests at once and check what each
        # one did; shedding (503 overloaded) has tests of its own (test_load, test_admission)
        max_requests_in_flight=256,
    )
    values.update(overrides)
    return Settings(**values)


@contextmanager
def broker_env(tmp_path: Path, db_url: str, *, run_tracker: bool = True, **overrides: Any) -> Iterator[BrokerEnv]:
    """Start a broker on ``db_url``: migrations, the local cluster (fast test settings), app."""
    settings = make_settings(tmp_path, db_url, **overrides)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(db_url)
    upgrade(engine)
    app = create_app(settings, engine=engine, run_tracker=run_tracker)
    # the embedded local cluster, sped up for tests; its discovered partitions follow
    # the test connection (prices and the memory rule read them)
    from dataclasses import asdict

    from adapters.local import LocalAdapter
    parts = [asdict(p) for p in LocalAdapter("local", LOCAL_TEST_CONNECTION, data_dir=str(tmp_path)).discover()]
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE clusters SET connection = :c, partitions = :p WHERE name = 'local'"),
                     {"c": __import__("json").dumps(LOCAL_TEST_CONNECTION), "p": __import__("json").dumps(parts)})
    with TestClient(app) as client:
        yield BrokerEnv(settings=settings, engine=engine, app=app, client=client)
    engine.dispose()
    _forget_fastapi_caches()


def _forget_fastapi_caches() -> None:
    """Empty FastAPI's module-level caches of endpoint callables (4,096 entries each).

    Each app's endpoints are closures over the app, so these caches kept the last
    ~150 test brokers alive, with their engines and settings: ~1.5 GB by the end of
    a test process, slower garbage collections throughout and ~40 s of collecting at
    its exit. Clearing a cache only costs the next app a re-classification."""
    from fastapi.dependencies import models

    for value in vars(models).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


def ledger_kinds(db_url: str, job_id: str) -> list[str]:
    """The kinds of a job's ledger entries, in order (settled once: reserve, release, charge)."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [k for (k,) in conn.execute(sa.text(
                "SELECT kind FROM ledger_entries WHERE job_id = :j ORDER BY id"), {"j": job_id})]
    finally:
        engine.dispose()
