"""B5 — a burst of readers (and optionally submitters) against one real
``aifa-broker serve`` process, on loopback only, bounded in time.

Starts ``aifa-broker serve`` on a fresh database (SQLite file or a new PostgreSQL
database), seeds a project with ``--jobs`` finished jobs, then runs ``--clients``
concurrent keep-alive HTTP/1.1 clients for ``--duration`` seconds:
``GET /v1/jobs/{id}`` and ``GET /v1/jobs`` (half each), plus with ``--submitters N``
that many clients submitting jobs with an ``Idempotency-Key`` (retried with the same
key on 503 until a definite answer). Clients honour ``Retry-After`` (with jitter), as
a well-behaved client does. It reports answers by status/code, 2xx throughput and
latency percentiles, and for submissions checks afterwards that no job was lost or
duplicated and nothing overspent (``aifa-broker ledger check``).

    .venv/bin/python bench/b5_reads.py [--db sqlite|postgresql] [--clients 500] [--duration 20]
                                       [--submitters 0] [--json]

tests/integration/test_load.py runs it (bounded) against the floor recorded in
bench/b5_floor.json; the measured figures are in bench/RESULTS.md ("B5").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.env import LOCAL_TEST_CONNECTION, fresh_database
from tests.support.server import free_port

BIN = Path(sys.executable).with_name("aifa-broker")
#: AIFA_B5_SOURCE=<a checkout> serves that tree's broker instead (a before/after comparison)
SOURCE = os.environ.get("AIFA_B5_SOURCE")
PROJECT = "EHPC-LOAD-001"
REQUEST_TIMEOUT = 30.0  # a client gives up after this (counted as "timeout": a failure)


@dataclass
class Result:
    """What the clients saw."""

    clients: int
    duration: float
    answers: Counter[str] = field(default_factory=Counter)  # "200", "503 overloaded", "timeout", ...
    latencies_ok: list[float] = field(default_factory=list)
    latencies_all: list[float] = field(default_factory=list)
    submissions: dict[str, str] = field(default_factory=dict)  # idempotency key → job id (2xx)
    submit_answers: Counter[str] = field(default_factory=Counter)
    keys_sent: set[str] = field(default_factory=set)
    keys_unresolved: set[str] = field(default_factory=set)
    conflicting_answers: int = 0

    @property
    def ok(self) -> int:
        return sum(n for k, n in self.answers.items() if k.startswith("2") or k.startswith("304"))

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: int) -> float:
            if len(values) < 2:
                return values[0] if values else 0.0
            return statistics.quantiles(values, n=100)[q - 1]

        return {
            "clients": self.clients, "duration_s": round(self.duration, 1),
            "answers": dict(self.answers), "ok_per_s": round(self.ok / self.duration, 1),
            "ok_p50_ms": round(pct(self.latencies_ok, 50) * 1000, 1),
            "ok_p95_ms": round(pct(self.latencies_ok, 95) * 1000, 1),
            "all_p99_ms": round(pct(self.latencies_all, 99) * 1000, 1),
            "max_ms": round(max(self.latencies_all, default=0) * 1000, 1),
            "submit_answers": dict(self.submit_answers), "jobs_submitted": len(self.submissions),
        }


# --- a small keep-alive HTTP/1.1 client (httpx at 500 clients costs more CPU than the server) ---

class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closing: list[asyncio.StreamWriter] = []

    async def request(self, method: str, path: str, headers: dict[str, str],
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("closed")
        status = int(status_line.split()[1])
        got: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            got[name.strip().lower()] = value.strip()
        data = await self.reader.readexactly(int(got.get("content-length", "0")))
        if got.get("connection", "").lower() == "close":
            self.close()
        return status, got, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.closing.append(self.writer)
        self.reader = self.writer = None

    async def aclose(self) -> None:
        self.close()
        for writer in self.closing:
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
        self.closing.clear()


async def _reader_client(conn: Conn, paths: list[str], token: str, deadline: float, res: Result) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        path = random.choice(paths)
        _, retry = await _one(conn, "GET", path, headers, b"", res)
        if retry:
            await asyncio.sleep(retry * random.uniform(0.5, 1.5))


async def _submitter_client(conn: Conn, token: str, deadline: float, res: Result) -> None:
    body = json.dumps({"project": PROJECT, "script": "true", "time_limit_minutes": 1}).encode()
    while time.monotonic() < deadline:
        key = uuid.uuid4().hex
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Idempotency-Key": key}
        res.keys_unresolved.add(key)
        for _ in range(50):  # the same key until a definite answer (or the run ends)
            status, retry = await _one(conn, "POST", "/v1/jobs", headers, body, res, key=key)
            if (200 <= status < 500 and status != 409) or (status == 409 and not retry):
                res.keys_unresolved.discard(key)  # definite (409 in progress carries Retry-After)
                break
            if time.monotonic() > deadline + 10:
                break
            await asyncio.sleep((retry or 1.0) * random.uniform(0.5, 1.5))
        await asyncio.sleep(random.uniform(0.05, 0.2))


async def _one(conn: Conn, method: str, path: str, headers: dict[str, str], body: bytes, res: Result,
               key: str | None = None) -> tuple[int, float]:
    """One request; returns (status, seconds to wait before the next one)."""
    start = time.monotonic()
    try:
        status, got, data = await asyncio.wait_for(conn.request(method, path, headers, body), REQUEST_TIMEOUT)
    except TimeoutError:
        conn.close()
        res.answers["timeout"] += 1
        res.latencies_all.append(time.monotonic() - start)
        return 0, 1.0
    except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        conn.close()
        res.answers[f"error {type(exc).__name__}"] += 1
        return 0, 1.0
    took = time.monotonic() - start
    res.latencies_all.append(took)
    label = str(status)
    if status >= 400:
        with contextlib.suppress(ValueError):
            label += " " + str(json.loads(data).get("code"))
    res.answers[label] += 1
    if status < 300:
        res.latencies_ok.append(took)
    if key is not None:
        res.submit_answers[label] += 1
        res.keys_sent.add(key)
        if status in (201, 202):
            job_id = json.loads(data)["id"]
            if res.submissions.setdefault(key, job_id) != job_id:
                res.conflicting_answers += 1
    return status, float(got.get("retry-after", "0") or 0) if status in (409, 429, 503) else 0.0


async def _run_clients(port: int, *, clients: int, submitters: int, duration: float, tokens: list[str],
                       job_ids: list[str]) -> Result:
    res = Result(clients=clients, duration=duration)
    # the seeded job i belongs to user i % len(tokens): each client reads its own user's jobs
    paths = [[f"/v1/jobs/{j}" for j in job_ids[u::len(tokens)]] for u in range(len(tokens))]
    paths = [p + ["/v1/jobs?limit=20"] * len(p) for p in paths]
    deadline = time.monotonic() + duration
    tasks = []
    conns = [Conn("127.0.0.1", port) for _ in range(clients)]
    for i, conn in enumerate(conns):
        if i < submitters:
            tasks.append(_submitter_client(conn, tokens[i % len(tokens)], deadline, res))
        else:
            tasks.append(_reader_client(conn, paths[i % len(tokens)], tokens[i % len(tokens)], deadline, res))
    start = time.monotonic()
    await asyncio.gather(*tasks)
    res.duration = time.monotonic() - start
    await asyncio.gather(*(c.aclose() for c in conns))
    return res


# --- the server under test --------------------------------------------------------------------

@contextlib.contextmanager
def serve(db_url: str, data_dir: Path, workers: int = 1, **settings: Any) -> Iterator[tuple[int, dict[str, str]]]:
    """One ``aifa-broker serve`` process (``workers`` API processes; 0: no ``--workers``
    option, for builds before it existed); yields its port and environment."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIFA_BROKER_")}
    env.update({"AIFA_BROKER_DATA_DIR": str(data_dir), "AIFA_BROKER_DATABASE_URL": db_url,
                "AIFA_BROKER_LOG_LEVEL": "WARNING", "AIFA_BROKER_LOCAL_CLUSTER_POLL_SECONDS": "0.5",
                "AIFA_BROKER_TRACKER_INTERVAL_SECONDS": "0.5"})
    env.update({f"AIFA_BROKER_{k.upper()}": str(v) for k, v in settings.items()})
    if SOURCE:
        env["PYTHONPATH"] = SOURCE
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "serve.log", "wb")  # noqa: SIM115 - closed below
    cmd = [str(BIN), "serve", "--port", str(port), *(["--workers", str(workers)] if workers else [])]
    proc = subprocess.Popen(cmd, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {(data_dir / 'serve.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not come up")
            time.sleep(0.2)
        yield port, env
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _seed(base: str, db_url: str, env: dict[str, str], jobs: int, amount: float,
          fast_local: bool) -> tuple[list[str], list[str]]:
    """Project, allocation, members through the API; ``jobs`` finished jobs directly in
    the database (seeding 2 000 through the local adapter would take minutes)."""
    def token(sub: str, *roles: str) -> str:
        cmd = [str(BIN), "token", "--sub", sub, *[a for r in roles for a in ("--role", r)]]
        return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()

    qm = {"Authorization": f"Bearer {token('qm', 'quota_manager', 'sysadmin')}"}
    users = [f"user{i}" for i in range(8)]
    with httpx.Client(base_url=base, headers=qm, timeout=30) as c:
        c.post("/v1/projects", json={"code": PROJECT, "title": "load", "status": "active",
                                     "access_mode": "playground"}).raise_for_status()
        c.post(f"/v1/projects/{PROJECT}/allocations", json={
            "cluster": "local", "unit": "core_hours", "amount": amount, "account": "proj-load"}).raise_for_status()
        if fast_local:  # submitted jobs end and settle within the run
            c.patch("/v1/clusters/local", json={"connection": LOCAL_TEST_CONNECTION}).raise_for_status()
        for u in users:
            c.post(f"/v1/projects/{PROJECT}/members", json={"user": u, "role": "member"}).raise_for_status()
            if fast_local:  # only submissions need a cluster account
                c.put(f"/v1/clusters/local/accounts/{u}", json={"username": u}).raise_for_status()
    tokens = [token(u) for u in users]
    engine = sa.create_engine(db_url)
    ids = [uuid.uuid4().hex for _ in range(jobs)]
    with engine.begin() as conn:
        ref = conn.execute(sa.text(
            "SELECT p.id, c.id, a.id FROM projects p JOIN allocations a ON a.project_id = p.id "
            "JOIN clusters c ON c.id = a.cluster_id WHERE p.code = :p"), {"p": PROJECT}).one()
        user_ids = dict(conn.execute(sa.text("SELECT name, id FROM users")).all())
        now = datetime.now(UTC)
        rows = [{"id": job_id, "p": ref[0], "c": ref[1], "a": ref[2], "u": user_ids[users[i % len(users)]],
                 "un": users[i % len(users)], "t": now - timedelta(seconds=jobs - i)}
                for i, job_id in enumerate(ids)]
        conn.execute(sa.text(
            "INSERT INTO jobs (id, project_id, cluster_id, user_id, allocation_id, name, partition, request, "
            "username, account, unit, estimated, reserved, charged, state, raw_state, scheduler_job_id, "
            "created_at, submitted_at, started_at, ended_at, settled_at, elapsed_seconds, alloc_tres) "
            "VALUES (:id, :p, :c, :u, :a, 'seeded', 'cpu', '{}', :un, 'proj-load', 'core_hours', 0, 0, 0, "
            "'COMPLETED', 'COMPLETED', :id, :t, :t, :t, :t, :t, 0, '{}')"), rows)
    engine.dispose()
    return tokens, ids


@dataclass
class Verdict:
    result: Result
    jobs_in_db: int = 0
    duplicate_keys: int = 0
    lost: list[str] = field(default_factory=list)
    ledger_ok: bool = True
    ledger_output: str = ""
    overspent: bool = False
    healthz_during_load_ms: float = 0.0
    serve_log_500s: int = 0


def run(db: str, *, clients: int, duration: float, submitters: int = 0, jobs: int = 2000,
        amount: float = 1e6, tmp: Path | None = None, workers: int = 1, **settings: Any) -> Verdict:
    """Start a server, seed it, run the clients; for submissions check the books."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * clients + 256)), hard))
    owned = tmp is None
    tmp = tmp or Path(tempfile.mkdtemp(prefix="aifa-b5-"))
    try:
        with fresh_database(db, tmp) as url, serve(url, tmp / "data", workers, **settings) as (port, env):
            base = f"http://127.0.0.1:{port}"
            tokens, ids = _seed(base, url, env, jobs, amount, fast_local=submitters > 0)
            verdict = Verdict(result=Result(clients=clients, duration=duration))
            probe = _ProbeDuringLoad(base, delay=duration / 2)
            probe.start()
            verdict.result = asyncio.run(_run_clients(port, clients=clients, submitters=submitters,
                                                      duration=duration, tokens=tokens, job_ids=ids))
            verdict.healthz_during_load_ms = probe.join()
            if submitters:
                _check_books(verdict, url, env, base)
            verdict.serve_log_500s = (tmp / "data" / "serve.log").read_text(errors="replace").count(
                "unhandled error on")
        return verdict
    finally:
        if owned:
            shutil.rmtree(tmp, ignore_errors=True)


class _ProbeDuringLoad:
    """Times one /healthz and one /metrics in the middle of the burst (on its own connection)."""

    def __init__(self, base: str, delay: float) -> None:
        import threading

        self.base, self.delay, self.took = base, delay, -1.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        time.sleep(self.delay)
        start = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):
            ok = httpx.get(f"{self.base}/healthz", timeout=10).status_code == 200
            ok = ok and httpx.get(f"{self.base}/metrics", timeout=10).status_code == 200
            if ok:
                self.took = (time.monotonic() - start) * 1000

    def join(self) -> float:
        self.thread.join(30)
        return self.took


def _check_books(verdict: Verdict, url: str, env: dict[str, str], base: str) -> None:
    res = verdict.result
    engine = sa.create_engine(url)
    deadline = time.monotonic() + 60  # the accepted jobs (`true`) finish and settle
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            live = conn.execute(sa.text("SELECT COUNT(*) FROM jobs WHERE name != 'seeded' AND settled_at IS NULL"
                                        )).scalar()
            conn.commit()
            if not live:
                break
            time.sleep(0.5)
        submitted = dict(conn.execute(sa.text("SELECT id, state FROM jobs WHERE name != 'seeded'")).all())
        granted, charged, reserved = conn.execute(sa.text(
            "SELECT granted, charged, reserved FROM allocations")).one()
    engine.dispose()
    verdict.jobs_in_db = len(submitted)
    verdict.lost = [j for j in res.submissions.values() if j not in submitted]
    # one job per key at most: a retry answered another job, or more jobs than keys sent
    verdict.duplicate_keys = res.conflicting_answers + max(0, len(submitted) - len(res.keys_sent))
    if not res.keys_unresolved:  # every key got a definite answer: the jobs are exactly those
        verdict.duplicate_keys += abs(len(submitted) - len(set(res.submissions.values())))
    verdict.overspent = charged + reserved > granted
    out = subprocess.run([str(BIN), "ledger", "check"], env=env, capture_output=True, text=True)
    verdict.ledger_ok, verdict.ledger_output = out.returncode == 0, (out.stdout + out.stderr).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--submitters", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=1, help="serve --workers")
    ap.add_argument("--amount", type=float, default=1e6, help="core-hours granted (submissions)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    v = run(args.db, clients=args.clients, duration=args.duration, submitters=args.submitters, jobs=args.jobs,
            workers=args.workers, amount=args.amount)
    out = {"db": args.db, "workers": args.workers, **v.result.summary(),
           "healthz_and_metrics_during_load_ms": round(v.healthz_during_load_ms), "serve_log_500s": v.serve_log_500s}
    if args.submitters:
        out.update(jobs_in_db=v.jobs_in_db, lost=len(v.lost), duplicates=v.duplicate_keys,
                   overspent=v.overspent, ledger_check=v.ledger_output)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
