"""A broker under test: real database (SQLite file or a fresh PostgreSQL database),
real app, real local adapter, real tracker thread. Used by unit/integration/e2e."""

from __future__ import annotations

import os
import time
import uuid
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
from broker.migrate import upgrade

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
def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database of ``kind`` (sqlite/postgresql), dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.sqlite3'}"
        return
    reason = postgres_available()
    if reason:
        if os.environ.get("AIFA_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"aifa_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        from broker.db import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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


def ledger_kinds(db_url: str, job_id: str) -> list[str]:
    """The kinds of a job's ledger entries, in order (settled once: reserve, release, charge)."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [k for (k,) in conn.execute(sa.text(
                "SELECT kind FROM ledger_entries WHERE job_id = :j ORDER BY id"), {"j": job_id})]
    finally:
        engine.dispose()
