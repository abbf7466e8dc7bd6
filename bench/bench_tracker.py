"""Benchmark: the tracker's own cost per cycle for N live jobs on one cluster.

The adapter is a stand-in that answers instantly (the scheduler's side is measured
by the adapters' own figures, e.g. ``squeue --json`` of ~650 jobs in 80 ms): this
isolates what the broker adds — loading the live jobs, one batched ``poll`` call,
state updates, and settlement (release + charge, two ledger rows per job).

    .venv/bin/python bench/bench_tracker.py [--db sqlite|postgresql] [-n 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlmodel import select

from broker.adapter import JobState, JobStatus, SchedulerJobRef
from broker.db import session_scope
from broker.models import Cluster, Job
from broker.services import ledger
from tests.support.env import broker_env, fresh_database
from tests.support.jobs import seed_live_jobs


class InstantAdapter:
    """Answers every poll at once with ``state`` for every ref."""

    def __init__(self) -> None:
        self.state, self.final, self.calls = JobState.RUNNING, False, 0

    def poll(self, refs: Sequence[SchedulerJobRef]) -> list[JobStatus]:
        self.calls += 1
        now = datetime.now(UTC)
        return [JobStatus(job_id=r.job_id, state=self.state, raw_state=self.state.value, final=self.final,
                          exit_code=0 if self.final else None, start_time=now, end_time=now if self.final else None,
                          elapsed_seconds=600 if self.final else None, alloc_tres={"cpu": 4, "gres/gpu": 1})
                for r in refs]


def seed(env, n: int) -> None:  # type: ignore[no-untyped-def]
    env.setup_project(amount=1e9, unit="gpu_hours")
    seed_live_jobs(env.engine, n, state="PENDING", partition="gpu", unit="gpu_hours", reserved=1_000_000)


def run(db: str, n: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="aifa-bench-"))
    with fresh_database(db, tmp) as url, broker_env(tmp, url, run_tracker=False) as env:
        seed(env, n)
        tracker, adapter = env.app.state.tracker, InstantAdapter()
        with session_scope(env.engine) as s:
            cluster = s.exec(select(Cluster).where(Cluster.name == "local")).one()
        first = _timed(tracker.poll_cluster, cluster, adapter)  # PENDING → RUNNING for all
        steady = _timed(tracker.poll_cluster, cluster, adapter)  # nothing changes
        adapter.state, adapter.final = JobState.COMPLETED, True
        settle = _timed(tracker.poll_cluster, cluster, adapter)  # all settle
        with session_scope(env.engine) as s:
            assert ledger.check(s) == []
            left = s.exec(select(Job).where(Job.settled_at == None)).all()  # noqa: E711
            assert not left and adapter.calls == 3
        return {"transition_s": first[0], "steady_s": steady[0], "settle_all_s": settle[0],
                "settle_per_job_ms": settle[0] / n * 1e3,
                # this process's CPU (the tracker's own; the database's is not in it)
                "transition_cpu_per_job_ms": first[1] / n * 1e3, "steady_cpu_per_job_ms": steady[1] / n * 1e3,
                "settle_cpu_per_job_ms": settle[1] / n * 1e3}


def _timed(fn: Callable[..., object], *args: object) -> tuple[float, float]:
    """Wall-clock and CPU seconds (of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="sqlite", choices=["sqlite", "postgresql"])
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()
    print(f"db={args.db} live jobs={args.n} (one adapter.poll call per cycle)")
    for key, value in run(args.db, args.n).items():
        print(f"  {key:26s} {value:8.3f}")


if __name__ == "__main__":
    main()
