"""The crash campaign (issue 10): a stream of keyed submissions while the real
``aifa-broker serve`` is SIGKILLed at random points, on ``local`` and on
``slurm_ssh`` (dev cluster 22.05); ≥ 20 kills in total, bounded, fixed seed.

Clients behave as the contract tells them: every submission carries an
``Idempotency-Key`` and is retried with the same key (connection refused, 409
``idempotency_in_progress``, 503) until it gets a definitive answer. Afterwards:

* every key got exactly one job, whatever the number of answers (never two jobs);
* every job the broker has belongs to an answered key, exists and settles exactly
  once (one reserve, one release, one charge in the ledger);
* no job on the cluster is unknown to the broker;
* no key is left ``in_progress`` (none wedged);
* ``aifa-broker ledger check`` is clean.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.support import slurm
from tests.support.env import fresh_database
from tests.support.server import free_port

BIN = str(Path(sys.executable).parent / "aifa-broker")
PROJECT = "EHPC-CRASH-001"
SEED = 20261130
CLIENTS = 4
CAMPAIGNS = [
    pytest.param("local", None, 12, 60, id="local"),
    pytest.param("slurm_ssh", "22.05", 10, 30, id="slurm_ssh-22.05", marks=pytest.mark.slurm),
]


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([BIN, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@contextmanager
def _serving(env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([BIN, "serve", "--port", str(port), "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError("broker did not start")
        time.sleep(0.05)
    try:
        yield proc
    finally:
        _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the broker and every process of its session (workers, tracker)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


class Stream:
    """Client threads submitting keyed jobs and retrying each key until answered."""

    def __init__(self, base: str, token: str, body: dict[str, Any], max_keys: int, rng: random.Random) -> None:
        self.base, self.body, self.max_keys = base, body, max_keys
        self.headers = {"Authorization": f"Bearer {token}"}
        self.lock = threading.Lock()
        self.pending: list[str] = []
        self.created = 0
        self.answers: dict[str, list[str]] = {}  # key → job ids of every 2xx answer
        self.errors: dict[str, list[str]] = {}  # key → unexpected definitive error answers
        self.new_keys = threading.Event()
        self.new_keys.set()
        self.stop = threading.Event()
        self.retries = 0
        self.rng = rng
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _next_key(self) -> str | None:
        with self.lock:
            if self.pending:
                return self.pending.pop(0)
            if self.new_keys.is_set() and self.created < self.max_keys:
                self.created += 1
                return f"crash-{self.created:04d}"
        return None

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self.stop.is_set():
                key = self._next_key()
                if key is None:
                    time.sleep(0.05)
                    continue
                try:
                    r = client.post("/v1/jobs", json=self.body, headers={**self.headers, "Idempotency-Key": key})
                except httpx.HTTPError:
                    self._retry(key)
                    continue
                if r.status_code in (201, 202):
                    with self.lock:
                        self.answers.setdefault(key, []).append(r.json()["id"])
                elif r.status_code in (409, 503) or r.status_code >= 500:
                    code = r.json().get("code") if r.headers.get("content-type", "").endswith("json") else None
                    if r.status_code == 409 and code != "idempotency_in_progress":
                        with self.lock:
                            self.errors.setdefault(key, []).append(f"{r.status_code} {r.text[:200]}")
                    else:
                        self._retry(key)
                else:
                    with self.lock:
                        self.errors.setdefault(key, []).append(f"{r.status_code} {r.text[:200]}")

    def _retry(self, key: str) -> None:
        with self.lock:
            self.retries += 1
            self.pending.append(key)
        time.sleep(0.1)


def _setup(env: dict[str, str], base: str, qm: str, adapter: str, release: str | None, account: str) -> str:
    head = {"Authorization": f"Bearer {qm}"}
    cluster = "local"
    with httpx.Client(base_url=base, headers=head, timeout=120) as c:
        if adapter != "local":
            assert release is not None
            definition = slurm.definition(release, adapter)
            definition["poll_interval_seconds"] = 1
            r = c.post("/v1/clusters", json=definition)
            assert r.status_code == 201, r.text
            cluster = definition["name"]
        for method, path, body in (
            ("POST", "/v1/projects", {"code": PROJECT, "title": "crash campaign", "status": "active"}),
            ("POST", f"/v1/projects/{PROJECT}/allocations",
             {"cluster": cluster, "unit": "core_hours", "amount": 100000, "account": account}),
            ("POST", f"/v1/projects/{PROJECT}/members", {"user": "alice", "role": "member"}),
            ("PUT", f"/v1/clusters/{cluster}/accounts/alice", {"username": "alice"}),
        ):
            deadline = time.monotonic() + 10
            while True:  # the previous step's write may still be committing (answered before its commit)
                r = c.request(method, path, json=body)
                if r.status_code != 404 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert r.status_code in (200, 201), r.text
    return cluster


def _cluster_jobs(env: dict[str, str], url: str, adapter: str, release: str | None, cluster: str,
                  since: datetime, name: str, account: str) -> set[str]:
    """Scheduler ids of every job this campaign put on the cluster (finished by now)."""
    if adapter != "local":
        assert release is not None
        out = slurm.run_in(release, "sacct", "-X", "-n", "-P", "-a", "-S", since.strftime("%Y-%m-%dT%H:%M:%S"),
                           "-o", "JobID,JobName,Account")
        ids = set()
        for line in out.splitlines():
            job_id, job_name, acct = ([*line.split("|"), "", "", ""])[:3]
            if job_name.startswith(f"{name}.aifa-") and acct == account:
                ids.add(job_id)
        return ids
    from broker.config import Settings
    from broker.registry import AdapterRegistry

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        connection = conn.execute(sa.text("SELECT connection FROM clusters WHERE name = :n"), {"n": cluster}).scalar()
    engine.dispose()
    settings = Settings(data_dir=Path(env["AIFA_BROKER_DATA_DIR"]), database_url=url)
    registry = AdapterRegistry(settings)
    try:
        conn_dict = connection if isinstance(connection, dict) else __import__("json").loads(connection or "{}")
        adapter_obj = registry.get(name=cluster, adapter="local", connection=conn_dict)
        return {r.job_id for r in adapter_obj.usage(since - timedelta(minutes=1), accounts=[account])}
    finally:
        registry.close()


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("adapter", "release", "kills", "max_keys"), CAMPAIGNS)
def test_crash_campaign(tmp_path: Path, adapter: str, release: str | None, kills: int, max_keys: int) -> None:
    if release is not None:
        slurm.require_cluster(release)
    rng = random.Random(f"{SEED}-{adapter}")
    name = f"crash{uuid.uuid4().hex[:8]}"
    account = "proj-a" if adapter != "local" else "proj-crash"
    since = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    with fresh_database("postgresql", tmp_path) as url:
        env = {**os.environ, "AIFA_BROKER_DATA_DIR": str(tmp_path / "data"), "AIFA_BROKER_DATABASE_URL": url,
               "AIFA_BROKER_LOCAL_CLUSTER_POLL_SECONDS": "0.3", "AIFA_BROKER_TRACKER_INTERVAL_SECONDS": "0.2",
               "AIFA_BROKER_IDEMPOTENCY_LEASE_SECONDS": "3", "AIFA_BROKER_RECONCILE_GRACE_SECONDS": "2",
               "AIFA_BROKER_RECONCILE_INTERVAL_SECONDS": "1", "AIFA_BROKER_RECONCILE_ABSENT_SECONDS": "20"}
        _cli(env, "db", "upgrade")
        qm = _cli(env, "token", "--sub", "qm", "--role", "quota_manager", "--role", "sysadmin")
        alice = _cli(env, "token", "--sub", "alice")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with _serving(env, port):
            cluster = _setup(env, base, qm, adapter, release, account)
        body = {"project": PROJECT, "cluster": cluster, "script": "#!/bin/bash\nsleep 1\n",
                "time_limit_minutes": 2, "name": name, "cpus_per_task": 1}
        stream = Stream(base, alice, body, max_keys, rng)
        stream.start()
        started = time.monotonic()
        for _ in range(kills):
            with _serving(env, port) as proc:
                time.sleep(rng.uniform(0.2, 2.0))  # a random point in the stream
                _kill(proc)
            time.sleep(rng.uniform(0.0, 0.5))
        stream.new_keys.clear()  # the stream ends; what is pending is retried until answered
        with _serving(env, port):
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                with stream.lock:
                    open_keys = stream.created - len(stream.answers) - len(stream.errors)
                if open_keys <= 0:
                    break
                time.sleep(0.2)
            stream.stop.set()
            for t in stream.threads:
                t.join(60)
            assert not stream.errors, stream.errors
            assert open_keys <= 0, f"{open_keys} keys never answered"
            job_ids = {ids[0] for ids in stream.answers.values()}
            head = {"Authorization": f"Bearer {alice}"}
            deadline = time.monotonic() + 240
            with httpx.Client(base_url=base, headers=head, timeout=30) as c:
                for job_id in sorted(job_ids):
                    while True:
                        r = c.get(f"/v1/jobs/{job_id}")
                        assert r.status_code == 200, r.text  # every 2xx job exists
                        if r.json()["charged"] is not None:
                            break
                        assert time.monotonic() < deadline, f"job never settled: {r.json()}"
                        time.sleep(0.5)
        campaign_seconds = time.monotonic() - started
        # one job per key, however many answers the retries got
        assert all(len(set(ids)) == 1 for ids in stream.answers.values()), stream.answers
        assert len(job_ids) == len(stream.answers) == stream.created
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, state, settled_at, scheduler_job_id FROM jobs")).all()
            ledger = conn.execute(sa.text(
                "SELECT job_id, kind, COUNT(*) FROM ledger_entries WHERE job_id IS NOT NULL "
                "GROUP BY job_id, kind")).all()
            wedged = conn.execute(sa.text(
                "SELECT COUNT(*) FROM idempotency_records WHERE state = 'in_progress'")).scalar()
            linked = dict(conn.execute(sa.text("SELECT job_id, key FROM idempotency_records "
                                               "WHERE job_id IS NOT NULL")).all())
        engine.dispose()
        assert {r.id for r in rows} == job_ids  # no job the clients were not told about
        assert all(r.settled_at is not None for r in rows)
        per_job: dict[str, dict[str, int]] = {}
        for job_id, kind, count in ledger:
            per_job.setdefault(job_id, {})[kind] = count
        assert all(per_job.get(j) == {"reserve": 1, "release": 1, "charge": 1} for j in job_ids), per_job
        assert wedged == 0
        assert set(linked) == job_ids
        on_cluster = _cluster_jobs(env, url, adapter, release, cluster, since, name, account)
        known = {r.scheduler_job_id for r in rows if r.scheduler_job_id}
        assert on_cluster <= known, f"jobs on the cluster unknown to the broker: {on_cluster - known}"
        assert "ledger consistent" in _cli(env, "ledger", "check")
        states: dict[str, int] = {}
        for r in rows:
            states[r.state] = states.get(r.state, 0) + 1
        print(f"\ncrash campaign {adapter}: {kills} kills, {len(job_ids)} jobs, {stream.retries} retries, "
              f"{len(on_cluster)} on the cluster, states {states}, {campaign_seconds:.0f}s")
