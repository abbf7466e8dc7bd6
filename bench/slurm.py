"""B1/B2 (submission through the broker vs the raw scheduler) and B4/B7 (tracking
held jobs) against the 22.05 dev cluster (deploy/slurm-dev). Skipped, with the
reason, when the cluster is not up.

Raw baselines use the adapters' own transports, so the difference is the broker:
B1's raw is ``sbatch --parsable`` over the same pooled paramiko connection the
``slurm_ssh`` adapter uses; B2's raw is slurmrestd's ``POST .../job/submit`` over
the ``slurm_rest`` adapter's HTTP client and JWT. Every job submitted here runs
``true`` for a second at most on the ``cpu`` partition; every job still queued at
the end is cancelled.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from bench.harness import PY, ROOT, Figure, free_port, server
from bench.loadgen import run_load
from broker.adapter import JobSpec
from broker.auth import issue_token
from tests.support.env import broker_env, fresh_database, make_settings

RELEASE = "22.05"
GEN = ROOT / "deploy" / "slurm-dev" / "generated" / RELEASE
PROJECT = "EHPC-BENCH-SLURM"
SCRIPT = "#!/bin/sh\ntrue\n"


def cluster_unavailable(release: str = RELEASE) -> str | None:
    """None when the dev cluster of ``release`` (default 22.05) answers; else why not."""
    info = GEN.parent / release / "info.json"
    if not info.exists():
        return f"no {info} (start it with `make slurm-up SLURM_RELEASE={release}`)"
    status = ROOT / "deploy" / "slurm-dev" / "status.sh"
    done = subprocess.run([str(status), release], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return f"the {release} dev cluster is not up ({status} {release} exited {done.returncode})"
    return None


def definition(kind: str, release: str = RELEASE) -> dict[str, Any]:
    with open(GEN.parent / release / f"{kind}.toml", "rb") as fh:
        return tomllib.load(fh)


def scancel(job_ids: list[str], release: str = RELEASE) -> None:
    """Cancel what is left of the benchmark's jobs (finished ones are no error)."""
    run_in = ROOT / "deploy" / "slurm-dev" / "run-in"
    for i in range(0, len(job_ids), 200):
        chunk = [j for j in job_ids[i:i + 200] if j.isdigit()]
        if chunk:
            subprocess.run([str(run_in), release, "scancel", *chunk], capture_output=True, timeout=120)


def jobs_held(release: str = RELEASE) -> int | None:
    """How many job records the dev cluster's slurmctld holds (queued, running, and
    ended ones not yet purged), or None when it cannot be read."""
    run_in = ROOT / "deploy" / "slurm-dev" / "run-in"
    done = subprocess.run([str(run_in), release, "squeue", "-h", "-t", "all", "-o", "%i"],
                          capture_output=True, text=True, timeout=120)
    return len(done.stdout.split()) if done.returncode == 0 else None


MAX_JOB_COUNT = 10_000  # deploy/slurm-dev: slurm.conf leaves Slurm's default
MIN_JOB_AGE_S = 300  # deploy/slurm-dev/up.sh: ended records are purged after this


def wait_for_room(planned: int, release: str = RELEASE, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Wait until slurmctld can take ``planned`` more jobs below MaxJobCount.

    Why: past MaxJobCount slurmctld refuses submissions with EAGAIN and ``sbatch``
    sleeps and retries (seconds per job), so a run that starts while an earlier run's
    ended jobs are still held measures that retry loop, on one side only. Ended
    records are purged MinJobAge after they end; this waits for that, at most once
    that long (plus a margin), and says so."""
    held = jobs_held(release)
    waited = 0.0
    deadline = time.monotonic() + MIN_JOB_AGE_S + 60
    while held is not None and held + planned > MAX_JOB_COUNT * 0.9 and time.monotonic() < deadline:
        if not waited:
            log(f"     slurmctld holds {held} job records; waiting for ended ones to be purged "
                f"(MinJobAge {MIN_JOB_AGE_S} s) so {planned} more stay below MaxJobCount {MAX_JOB_COUNT}")
        time.sleep(10)
        waited += 10
        held = jobs_held(release)
    return {"jobs_held_at_start": held, "waited_for_room_s": waited}


@contextmanager
def bench_account(user: str = "alice", release: str = RELEASE) -> Iterator[str]:
    """A Slurm account of this benchmark run alone, with ``user`` in it (removed after).

    Why: the broker's usage import charges every job of its allocations' accounts in the
    last 48 h that it did not submit itself, as direct usage. On a shared account
    (proj-a) a fresh benchmark broker found every earlier run's jobs there (other
    brokers' jobs, B4's thousands of held jobs, the raw baseline's) and imported them
    in its tracker process while B1/B2 were being measured. On an account of its own it
    sees only its own jobs, as a broker in service does."""
    run_in = str(ROOT / "deploy" / "slurm-dev" / "run-in")
    name = f"aifa-bench-{os.getpid()}-{int(time.time())}"

    def sacctmgr(*args: str) -> None:
        subprocess.run([run_in, release, "sacctmgr", "-i", *args], capture_output=True, timeout=120, check=True)

    sacctmgr("add", "account", name, "description=aifa-broker benchmark", "organization=aifa")
    sacctmgr("add", "user", user, f"account={name}")
    try:
        yield name
    finally:  # best effort (its jobs cancelled first: an account with queued jobs stays)
        subprocess.run([run_in, release, "scancel", f"--account={name}"], capture_output=True, timeout=120)
        for args in (("delete", "user", user, f"account={name}"), ("delete", "account", name)):
            with suppress(subprocess.CalledProcessError):
                sacctmgr(*args)


def _spec(i: int) -> JobSpec:
    return JobSpec(tag=f"bench-raw-{i}", username="alice", account="proj-a", script=SCRIPT,
                   time_limit_minutes=1, partition="cpu", name="bench")


def raw_rate(submit: Callable[[JobSpec], str], *, n: int, concurrency: int) -> tuple[float, float, list[str]]:
    """Submissions/s and p50 (ms) of ``submit`` at ``concurrency`` threads; the job ids."""
    ids: list[str] = []
    latencies: list[float] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        ids.append(submit(_spec(i)))
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return n / wall, latencies[len(latencies) // 2] * 1000, ids


@contextmanager
def slurm_broker(kind: str, *, workers: int, db: str = "postgresql", tracker: bool = True) -> Iterator[dict[str, Any]]:
    """A fresh database with the dev cluster registered and a broker serving it
    (``tracker=False``: without the tracker, whose polls would count as the server's CPU)."""
    tmp = Path(tempfile.mkdtemp(prefix="aifa-bench-slurm-"))
    doc = definition(kind)
    with bench_account() as account, fresh_database(db, tmp) as url:
        with broker_env(tmp, url, run_tracker=False) as env:
            r = env.call("POST", "/v1/clusters", env.qm, json={
                k: doc[k] for k in ("name", "adapter", "default_partition", "poll_interval_seconds", "connection")})
            assert r.status_code == 201, r.text
            env.setup_project(PROJECT, amount=1e9, cluster=doc["name"], account=account)
        settings = make_settings(tmp, url)
        port = free_port()
        senv = {**os.environ, "AIFA_BROKER_DATA_DIR": str(settings.data_dir), "AIFA_BROKER_DATABASE_URL": url,
                "AIFA_BROKER_LOG_LEVEL": "WARNING", "AIFA_BROKER_RUN_TRACKER": str(tracker).lower()}
        senv.pop("PROMETHEUS_MULTIPROC_DIR", None)
        bin_ = str(Path(PY).parent / "aifa-broker")
        with server([bin_, "serve", "--port", str(port), "--workers", str(workers)], senv, port,
                    workers=workers) as proc:
            yield {"base": f"http://127.0.0.1:{port}", "url": url, "cluster": doc["name"], "proc": proc,
                   "token": issue_token(settings, sub="alice", roles=[])}


def _broker_rate(b: dict[str, Any], *, n: int, concurrency: int) -> tuple[float, float, list[str]]:
    head = {"Authorization": f"Bearer {b['token']}"}
    body = {"project": PROJECT, "cluster": b["cluster"], "script": SCRIPT, "time_limit_minutes": 1,
            "partition": "cpu", "name": "bench"}
    res = run_load(b["base"], [("POST", "/v1/jobs", head, body)] * n, concurrency=concurrency, keep_bodies=True)
    assert res.errors() == 0, (res.statuses, res.bodies[:1])
    ids = [str(json.loads(x).get("scheduler_job_id")) for x in res.bodies]
    return res.rate, res.p50_ms, ids


def submit_figures(kind: str, *, runs: int, n: int, levels: tuple[int, ...], workers: int) -> list[Figure]:
    """B1 (kind slurm_ssh) or B2 (slurm_rest) at each concurrency level."""
    reason = cluster_unavailable()
    fid = "B1" if kind == "slurm_ssh" else "B2"
    targets = {1: 0.6, 8: 0.8, 32: 0.8} if fid == "B1" else {1: None, 8: 0.5, 32: 0.5}
    figs = []
    for c in levels:
        t = targets.get(c)
        figs.append(Figure(fid, f"submit via API, {kind}, c={c}, {workers} workers, PostgreSQL", "jobs/s",
                           f"≥ {t}× raw" if t else "(no target at c=1)", min_ratio=t))
    if reason:
        for f in figs:
            f.skipped = reason
        return figs
    from broker import plugins

    adapter = plugins.load_adapter_class(kind)(definition(kind)["name"], definition(kind)["connection"],
                                               data_dir=tempfile.mkdtemp(prefix="aifa-bench-raw-"))
    raw_submit = _raw_submitter(kind, adapter)
    all_ids: list[str] = []
    room = wait_for_room(sum(2 * (runs * n + 2 * c) for c in levels) + 8)
    for fig in figs:
        fig.extra.update(room)
    try:
        raw_submit(_spec(-1))  # warm: connection, certificate / token
        with slurm_broker(kind, workers=workers) as b:
            _broker_rate(b, n=4, concurrency=1)  # warm the workers
            for fig, c in zip(figs, levels, strict=True):
                # both sides warmed at this concurrency first (threads, SSH channels or HTTP
                # connections, database connections), so no run measures its own start-up
                all_ids += raw_rate(raw_submit, n=2 * c, concurrency=c)[2]
                all_ids += _broker_rate(b, n=2 * c, concurrency=c)[2]
                raw_p50, api_p50 = [], []
                for _ in range(runs):
                    rate, p50, ids = raw_rate(raw_submit, n=n, concurrency=c)
                    fig.baseline_runs.append(rate)
                    raw_p50.append(p50)
                    all_ids += ids
                    rate, p50, ids = _broker_rate(b, n=n, concurrency=c)
                    fig.runs.append(rate)
                    api_p50.append(p50)
                    all_ids += ids
                fig.extra.update(raw_p50_ms=raw_p50, api_p50_ms=api_p50,
                                 broker_added_p50_ms=sorted(a - r for a, r in zip(api_p50, raw_p50, strict=True)))
                if fid == "B1" and c == 1:
                    added = sorted(a - r for a, r in zip(api_p50, raw_p50, strict=True))[len(api_p50) // 2]
                    fig.extra["target_broker_added_p50_ms"] = "≤ 5"
                    fig.extra["broker_added_p50_met"] = added <= 5
    finally:
        adapter.close()
        scancel(all_ids)
    return figs


def _raw_submitter(kind: str, adapter: Any) -> Callable[[JobSpec], str]:
    if kind == "slurm_ssh":
        from adapters.slurm_ssh import commands, parse

        def ssh(spec: JobSpec) -> str:
            cmd = commands.build_submit(spec, adapter.config.output_dir)
            result = adapter._run(spec.username, cmd.command, stdin=cmd.stdin, idempotent=False)
            assert result.ok, result.stderr
            return str(parse.parse_sbatch_job_id(result.stdout))

        return ssh

    def rest(spec: JobSpec) -> str:
        layer = adapter.api(spec.username)
        body = layer.submit_body(adapter._submit_request(spec))
        answer = adapter._client.request("POST", layer.submit_path, username=spec.username, body=body,
                                         during="submit", submitting=True)
        return str(layer.submitted_job_id(answer))

    return rest
