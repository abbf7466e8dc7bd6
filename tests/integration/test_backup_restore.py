"""Backup and restore of a PostgreSQL broker database, as docs/operations.md says:
``pg_dump -Fc`` of a live broker (settled jobs and one still running), restored with
``pg_restore`` into an empty database → ``aifa-broker ledger check`` passes on the
restored copy, every balance and ledger entry is there, the schema is current, and
a broker started on the copy tracks the running job to its charge."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from broker.migrate import is_up_to_date
from tests.support.env import broker_env, fresh_database

BIN = str(Path(sys.executable).parent / "aifa-broker")
TABLES = ("projects", "allocations", "memberships", "jobs", "ledger_entries")


def _libpq(url: str) -> str:
    """The SQLAlchemy URL as libpq understands it (pg_dump, pg_restore)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _snapshot(url: str) -> dict[str, object]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        out: dict[str, object] = {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in TABLES}
        out["balances"] = conn.execute(sa.text(
            "SELECT id, granted, charged, reserved FROM allocations ORDER BY id")).all()
        out["ledger"] = conn.execute(sa.text(
            "SELECT id, kind, amount, job_id FROM ledger_entries ORDER BY id")).all()
    engine.dispose()
    return out


def _ledger_check(url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AIFA_BROKER_DATABASE_URL": url, "AIFA_BROKER_DATA_DIR": str(data_dir)}
    env.pop("AIFA_BROKER_CONFIG", None)
    return subprocess.run([BIN, "ledger", "check"], env=env, capture_output=True, text=True, check=False)


def test_dump_and_restore_keeps_a_consistent_ledger(tmp_path: Path) -> None:
    for tool in ("pg_dump", "pg_restore"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} missing (PostgreSQL client tools)")
    dump = tmp_path / "broker.dump"
    with fresh_database("postgresql", tmp_path / "src", migrated=True) as src_url:
        with broker_env(tmp_path / "src", src_url) as env:
            env.setup_project(amount=50)
            alice = env.auth("alice")
            done = []
            for i in range(3):
                r = env.call("POST", "/v1/jobs", alice, json={
                    "project": "EHPC-TEST-001", "script": f"#!/bin/sh\necho {i}\n", "time_limit_minutes": 5})
                assert r.status_code == 201, r.text
                done.append(r.json()["id"])
            for job_id in done:
                env.wait_settled(job_id, alice)
            r = env.call("PATCH", "/v1/projects/EHPC-TEST-001/allocations/"
                         f"{env.call('GET', '/v1/projects/EHPC-TEST-001', alice).json()['allocations'][0]['id']}",
                         env.qm, json={"amount": 60, "reason": "top-up before the backup"})
            assert r.status_code == 200, r.text
            running = env.call("POST", "/v1/jobs", alice, json={
                "project": "EHPC-TEST-001", "script": "#!/bin/sh\nsleep 3\n", "time_limit_minutes": 5}).json()
            env.wait_job(running["id"], alice, lambda j: j["state"] == "RUNNING")
            # the backup, taken while the broker runs (pg_dump reads one consistent snapshot)
            subprocess.run(["pg_dump", "-Fc", "--no-owner", "-f", str(dump), _libpq(src_url)], check=True,
                           capture_output=True, timeout=120)
            before = _snapshot(src_url)

        with fresh_database("postgresql", tmp_path / "dst") as dst_url:
            subprocess.run(["pg_restore", "--no-owner", "--exit-on-error", "-d", _libpq(dst_url), str(dump)],
                           check=True, capture_output=True, timeout=120)
            assert _snapshot(dst_url) == before
            engine = sa.create_engine(dst_url)
            assert is_up_to_date(engine)
            engine.dispose()
            check = _ledger_check(dst_url, tmp_path / "dst" / "data")
            assert check.returncode == 0 and "ledger consistent" in check.stdout, check.stdout + check.stderr

            # a broker started on the restored copy (same data directory: its signing key and
            # the local cluster's job files) settles the job that ran at backup time
            with broker_env(tmp_path / "src", dst_url) as restored:
                job = restored.wait_settled(running["id"], alice, timeout=60)
                assert job["state"] == "COMPLETED" and job["charged"] is not None
            check = _ledger_check(dst_url, tmp_path / "dst" / "data")
            assert check.returncode == 0, check.stdout + check.stderr

            # the check is meaningful: a drifted balance is reported
            engine = sa.create_engine(dst_url)
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE allocations SET charged = charged + 1"))
            engine.dispose()
            check = _ledger_check(dst_url, tmp_path / "dst" / "data")
            assert check.returncode == 1 and "charged stored" in check.stdout
