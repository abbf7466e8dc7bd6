"""The broker restarted mid-job (SIGKILL): the job is still tracked and settled once.

Runs the real ``aifa-broker serve`` as a subprocess on the embedded defaults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.support.env import fresh_database
from tests.support.server import free_port, wait_ready

BIN = str(Path(sys.executable).parent / "aifa-broker")


@pytest.fixture(params=["sqlite", "postgresql"])
def broker_dirs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    with fresh_database(request.param, tmp_path) as url:
        yield {**os.environ, "AIFA_BROKER_DATA_DIR": str(tmp_path / "data"), "AIFA_BROKER_DATABASE_URL": url,
               "AIFA_BROKER_LOCAL_CLUSTER_POLL_SECONDS": "0.3", "AIFA_BROKER_TRACKER_INTERVAL_SECONDS": "0.2"}


@contextmanager
def serve(env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([BIN, "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=90)  # a loaded CI host starts it slowly
    except AssertionError as exc:
        if proc.poll() is None:  # its stderr ends only when it does
            proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"{exc}: {err.decode(errors='replace')[-4000:]}") from exc
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def _cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run([BIN, *args], env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_sigkill_mid_job_then_restart_settles_once(broker_dirs: dict[str, str]) -> None:
    env = broker_dirs
    _cli(env, "demo", "--user", "alice")
    token = _cli(env, "token", "--sub", "alice")
    headers = {"Authorization": f"Bearer {token}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serve(env, port) as proc:
        job = httpx.post(f"{base}/v1/jobs", headers=headers, json={
            "project": "EHPC-AIF-DEMO-001", "script": "#!/bin/sh\nsleep 4\necho done\n",
            "time_limit_minutes": 5}).json()
        assert job["state"] == "PENDING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    time.sleep(5)  # the job ends while no broker is running
    with serve(env, port):
        deadline = time.monotonic() + 30
        while True:
            got = httpx.get(f"{base}/v1/jobs/{job['id']}", headers=headers).json()
            if got["charged"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert got["state"] == "COMPLETED" and got["exit_code"] == 0
    assert 3 <= got["elapsed_seconds"] <= 8
    engine = sa.create_engine(env["AIFA_BROKER_DATABASE_URL"])
    with engine.connect() as conn:
        kinds = [k for (k,) in conn.execute(sa.text(
            "SELECT kind FROM ledger_entries WHERE job_id = :j ORDER BY id"), {"j": job["id"]})]
    engine.dispose()
    assert kinds == ["reserve", "release", "charge"]
    assert "ledger consistent" in _cli(env, "ledger", "check")
