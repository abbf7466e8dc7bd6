"""``aifa-broker serve --workers 2``: several API processes, one tracker, summed metrics,
and no orphan left holding the port when the parent is SIGKILLed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.server import free_port

BIN = str(Path(sys.executable).parent / "aifa-broker")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _start(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([BIN, "serve", "--port", str(port), "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "broker did not start"
        time.sleep(0.2)


def test_workers_share_the_load_one_tracker_summed_metrics(tmp_path: Path) -> None:
    env = {**os.environ, "AIFA_BROKER_DATA_DIR": str(tmp_path / "data"),
           "AIFA_BROKER_LOCAL_CLUSTER_POLL_SECONDS": "0.3", "AIFA_BROKER_TRACKER_INTERVAL_SECONDS": "0.2"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    subprocess.run([BIN, "demo", "--user", "alice"], env=env, check=True, capture_output=True)
    token = subprocess.run([BIN, "token", "--sub", "alice"], env=env, check=True, capture_output=True,
                           text=True).stdout.strip()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(env, port)
    try:
        # 2 workers + the tracker process (+ multiprocessing's resource tracker at most)
        assert 3 <= len(_children(proc.pid)) <= 4
        ids = []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            for _ in range(12):  # new connections: the kernel spreads them over the workers
                r = httpx.post(f"{base}/v1/jobs", headers=c.headers, timeout=30, json={
                    "project": "EHPC-AIF-DEMO-001", "script": "true", "time_limit_minutes": 5})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            deadline = time.monotonic() + 60
            while not all(c.get(f"/v1/jobs/{i}").json()["charged"] is not None for i in ids):
                assert time.monotonic() < deadline, "the tracker process did not settle the jobs"
                time.sleep(0.3)
            for _ in range(4):  # whichever worker answers, it reports every process's counts
                text = httpx.get(f"{base}/metrics", timeout=10).text
                submitted = re.search(r'^aifa_jobs_submitted_total\{cluster="local"\} (\S+)$', text, re.M)
                settled = re.search(r'^aifa_jobs_settled_total\{state="COMPLETED"\} (\S+)$', text, re.M)
                assert submitted and float(submitted.group(1)) == 12
                assert settled and float(settled.group(1)) == 12  # counted in the tracker process
    finally:
        children = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children):
        assert time.monotonic() < deadline, "worker processes outlived the SIGKILLed parent"
        time.sleep(0.1)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)


def _listening_pids(port: int) -> set[int]:
    """The processes with a listening socket on ``port``."""
    out = subprocess.run(["ss", "-tlnpH", f"( sport = :{port} )"], capture_output=True, text=True,
                         check=True).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


def _server_side_pids(port: int) -> set[int]:
    """The processes owning the established server-side sockets of ``port``."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


async def _burst(base: str, n: int) -> list[httpx.AsyncClient]:
    """``n`` connections opened at once, each kept open after one request."""
    import asyncio

    clients = [httpx.AsyncClient(base_url=base, timeout=30) for _ in range(n)]
    answers = await asyncio.gather(*(c.get("/healthz") for c in clients))
    assert all(a.status_code == 200 for a in answers)
    return clients


def test_a_burst_of_connections_is_spread_and_the_port_is_not_shared(tmp_path: Path) -> None:
    """With a shared listening socket, asyncio accepted a whole burst in one worker, which
    then served those keep-alive connections alone; each worker has its own socket now.
    A second broker on the same port is refused, not mixed in (SO_REUSEPORT would allow it)."""
    import asyncio

    env = {**os.environ, "AIFA_BROKER_DATA_DIR": str(tmp_path / "data"), "AIFA_BROKER_RUN_TRACKER": "false"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = free_port()
    proc = _start(env, port)
    try:
        workers = set(_children(proc.pid))
        # every worker listening first: /healthz answered by one worker says nothing of the
        # other, still importing the app on a loaded machine, whose socket is not yet in
        # the SO_REUSEPORT group (then the whole burst goes, rightly, to the one listening)
        deadline = time.monotonic() + 60
        while len(_listening_pids(port) & workers) < 2:
            assert time.monotonic() < deadline, f"workers listening: {_listening_pids(port) & workers}"
            time.sleep(0.2)

        async def check() -> set[int]:
            clients = await _burst(f"http://127.0.0.1:{port}", 16)
            try:
                return _server_side_pids(port) & workers
            finally:
                await asyncio.gather(*(c.aclose() for c in clients))

        serving = asyncio.run(check())
        assert len(serving) == 2, f"16 connections held by {len(serving)} worker(s)"  # chance of 1: 2 × 2⁻¹⁶
        second = subprocess.run([BIN, "serve", "--port", str(port), "--workers", "2"], capture_output=True,
                                text=True, timeout=120,
                                env={**env, "AIFA_BROKER_DATA_DIR": str(tmp_path / "other")})
        assert second.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
