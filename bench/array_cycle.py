"""The tracker's CPU for a steady cycle over live job arrays (nothing changes).

    .venv/bin/python -m bench.array_cycle [--db postgresql] [--arrays 3] [--tasks 1000] [--cycles 5]

Arrays are submitted through the API on the embedded ``local`` cluster, whose adapter
is told to accept them without running anything; then the tracker polls a stand-in
adapter that reports every task RUNNING, first once (PENDING → RUNNING: every task
written), then ``cycles`` times with nothing to change. Prints this process's CPU per
steady cycle (the tracker's share; PostgreSQL's is not in it) and checks that a steady
cycle wrote nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import select

from broker import direct
from broker.adapter import JobSpec, JobState, JobStatus, SchedulerJobRef
from broker.db import session_scope
from broker.models import Cluster
from broker.services.clusters import adapter_for
from tests.support.env import broker_env, fresh_database


class RunningTasks:
    """Every task of every array ref RUNNING, at once."""

    def __init__(self) -> None:
        self.started = datetime.now(UTC)

    def poll(self, refs: Sequence[SchedulerJobRef]) -> list[JobStatus]:
        return [JobStatus(job_id=f"{r.job_id}_{t}", state=JobState.RUNNING, raw_state="RUNNING", final=False,
                          start_time=self.started, array_task_id=t)
                for r in refs for t in (r.array_tasks or ())]


@contextmanager
def _sent(engine: sa.Engine) -> Iterator[list[str]]:
    """Every statement sent on ``engine`` (SQLAlchemy's and the driver-cursor path's)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement.strip())

    sa.event.listen(engine, "before_cursor_execute", record)
    direct.OBSERVERS.append(sent.append)
    try:
        yield sent
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
        direct.OBSERVERS.remove(sent.append)


def run(db: str, arrays: int, tasks: int, cycles: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="aifa-bench-arrays-"))
    with fresh_database(db, tmp) as url, broker_env(tmp, url, run_tracker=False) as env:
        env.setup_project(amount=1e9)
        with session_scope(env.engine) as s:
            cluster = s.exec(select(Cluster).where(Cluster.name == "local")).one()
        ids = itertools.count(500_000)

        def accept(spec: JobSpec) -> SchedulerJobRef:
            return SchedulerJobRef(job_id=str(next(ids)), username=spec.username, tag=spec.tag,
                                   submit_time=datetime.now(UTC))

        adapter_for(env.app.state.registry, cluster).submit = accept  # type: ignore[method-assign]
        script = f"#!/bin/sh\n#SBATCH --array=0-{tasks - 1}\nsleep 600\n"
        for _ in range(arrays):
            r = env.call("POST", "/v1/jobs", env.auth("alice"),
                         json={"project": "EHPC-TEST-001", "script": script, "time_limit_minutes": 30})
            assert r.status_code == 201, r.text
        tracker, stand_in = env.app.state.tracker, RunningTasks()
        t0 = time.process_time()
        tracker.poll_cluster(cluster, stand_in)  # every task PENDING → RUNNING
        first = time.process_time() - t0
        steady: list[float] = []
        with _sent(env.engine) as sent:
            for _ in range(cycles):
                t0 = time.process_time()
                tracker.poll_cluster(cluster, stand_in)
                steady.append(time.process_time() - t0)
        # the cluster's own heartbeat (last_poll_at) is written every cycle; no job, task or event
        writes = [w for w in sent if w.split(None, 1)[0].upper() in {"UPDATE", "INSERT", "DELETE", "WITH"}
                  and not w.upper().startswith("UPDATE CLUSTERS")]
        assert not writes, f"a steady cycle wrote: {writes[:3]}"
        with env.engine.connect() as conn:
            running = conn.execute(sa.text("SELECT COUNT(*) FROM job_tasks WHERE state = 'RUNNING'")).scalar_one()
        assert running == arrays * tasks, running
        return {"db": db, "arrays": arrays, "tasks": tasks, "first_cycle_cpu_ms": round(first * 1e3, 1),
                "steady_cycle_cpu_ms": [round(x * 1e3, 1) for x in steady],
                "steady_cycle_cpu_ms_median": round(statistics.median(steady) * 1e3, 1),
                "statements_per_steady_cycle": len(sent) / cycles}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="postgresql", choices=["postgresql", "sqlite"])
    ap.add_argument("--arrays", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(run(args.db, args.arrays, args.tasks, args.cycles)))


if __name__ == "__main__":
    main()
