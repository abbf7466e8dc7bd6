"""B4 (tracking real held jobs: scheduler calls, cycle time, writes) and B7 (RSS while
tracking) on the 22.05 dev cluster.

The jobs are the benchmark's own: ``sbatch --hold`` as alice on proj-a (they never
run), all cancelled at the end. The dev cluster's slurmctld has MaxJobCount=10000
and other people test on it, so the default is 2,000 held jobs for a short window;
``--held`` raises it. Cost per job is reported so 10,000 can be read off.
"""

from __future__ import annotations

import contextlib
import resource
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import select

from bench.harness import Figure
from bench.slurm import PROJECT, RELEASE, bench_account, cluster_unavailable, definition, scancel, wait_for_room
from broker.adapter import JobSpec
from broker.db import session_scope
from broker.models import Allocation, Cluster, Job, User
from tests.support.env import broker_env, fresh_database

HELD_SCRIPT = "#!/bin/sh\ntrue\n"


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _submit_held(adapter: Any, n: int, account: str) -> list[str]:
    from adapters.slurm_ssh import commands, parse

    def one(i: int) -> str:
        spec = JobSpec(tag=f"bench-held-{i}", username="alice", account=account, script=HELD_SCRIPT,
                       time_limit_minutes=1, partition="cpu", name="bench-held")
        cmd = commands.build_submit(spec, adapter.config.output_dir)
        held = cmd.command.replace(" sbatch ", " sbatch --hold ", 1)  # the adapter has no hold option
        assert held != cmd.command, cmd.command
        result = adapter._run("alice", held, stdin=cmd.stdin, idempotent=False)
        assert result.ok, result.stderr
        return str(parse.parse_sbatch_job_id(result.stdout))

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def b4_b7(*, held: int, cycles: int = 3, release: str = RELEASE) -> list[Figure]:
    b4_calls = Figure("B4", f"scheduler calls per cycle, {held} held jobs, slurm_ssh {release}", "calls",
                      "≤ 2 per cluster per cycle", max_value=2)
    b4_cycle = Figure("B4", f"steady tracker cycle, {held} held jobs (scheduler included)", "s", "≤ 1 s",
                      max_value=1.0)
    b4_writes = Figure("B4", "job rows written in a steady cycle", "rows", "only changed jobs (0)", max_value=0)
    b7 = Figure("B7", f"RSS of the tracking process, {held} held jobs", "MB", "≤ 300 MB", max_value=300)
    figs = [b4_calls, b4_cycle, b4_writes, b7]
    reason = cluster_unavailable(release)
    if reason:
        for f in figs:
            f.skipped = reason
        return figs
    from broker import plugins

    doc = definition("slurm_ssh", release)
    raw = plugins.load_adapter_class("slurm_ssh")(doc["name"], doc["connection"],
                                                  data_dir=tempfile.mkdtemp(prefix="aifa-bench-held-"))
    ids: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="aifa-bench-track-"))
    stack = contextlib.ExitStack()
    try:
        # an account of its own: the held jobs, cancelled at the end, stay in the
        # accounting of this account only (not in proj-a's, which the tests import)
        account = stack.enter_context(bench_account(release=release))
        b4_cycle.extra.update(wait_for_room(held + 10, release))
        t0 = time.perf_counter()
        ids = _submit_held(raw, held, account)
        b4_cycle.extra["submit_held_s"] = time.perf_counter() - t0
        with fresh_database("postgresql", tmp) as url, broker_env(tmp, url, run_tracker=False) as env:
            r = env.call("POST", "/v1/clusters", env.qm, json={
                k: doc[k] for k in ("name", "adapter", "default_partition", "poll_interval_seconds", "connection")})
            assert r.status_code == 201, r.text
            env.setup_project(PROJECT, amount=1e12, cluster=doc["name"], account=account)
            with session_scope(env.engine) as s:
                cluster = s.exec(select(Cluster).where(Cluster.name == doc["name"])).one()
                alloc = s.exec(select(Allocation)).one()
                user = s.exec(select(User).where(User.name == "alice")).one()
                now = datetime.now(UTC)
                s.execute(sa.insert(Job.__table__), [  # type: ignore[attr-defined]
                    {"id": uuid.uuid4().hex, "project_id": alloc.project_id, "cluster_id": cluster.id,
                     "user_id": user.id, "allocation_id": alloc.id, "name": "bench-held", "partition": "cpu",
                     "username": "alice", "account": account, "unit": alloc.unit, "estimated": 1,
                     "reserved": 0, "state": "PENDING", "scheduler_job_id": j, "submitted_at": now,
                     "created_at": now, "request": {}} for j in ids])
            tracker = env.app.state.tracker
            adapter = env.app.state.registry.get(name=cluster.name, adapter=cluster.adapter,
                                                 connection=cluster.connection)
            writes = {"n": 0}

            def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
                if statement.lstrip().upper().startswith("UPDATE JOBS"):
                    writes["n"] += 1

            polls: list[float] = []
            poll = adapter.poll

            def timed_poll(refs: Any) -> Any:  # the adapter's share of a cycle (squeue over SSH + parse)
                t0 = time.perf_counter()
                try:
                    return poll(refs)
                finally:
                    polls.append(time.perf_counter() - t0)

            adapter.poll = timed_poll  # type: ignore[method-assign]
            sa.event.listen(env.engine, "before_cursor_execute", count)
            tracker.poll_cluster(cluster, adapter)  # first cycle: pending reasons are recorded
            polls.clear()
            for _ in range(cycles):
                calls0, writes["n"] = adapter.scheduler_calls(), 0
                t0 = time.perf_counter()
                tracker.poll_cluster(cluster, adapter)
                b4_cycle.runs.append(time.perf_counter() - t0)
                b4_calls.runs.append(adapter.scheduler_calls() - calls0)
                b4_writes.runs.append(writes["n"])
                b7.runs.append(_rss_mb())
            sa.event.remove(env.engine, "before_cursor_execute", count)
            adapter.poll = poll  # type: ignore[method-assign]
            b4_cycle.extra["adapter_poll_s"] = polls
            b7.extra["max_rss_mb_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            b7.extra["note"] = "the benchmark process itself (app + tracker + test client): an upper bound"
    finally:
        raw.close()
        scancel(ids, release)
        stack.close()
    per_job = (b4_cycle.value or 0) / max(held, 1)
    b4_cycle.extra["seconds_per_job"] = per_job
    b4_cycle.extra["extrapolated_10000_s"] = per_job * 10_000
    return figs
