"""CPU per job of each process of a multi-worker broker on the dev cluster, the
tracker's whole share included (B1's submissions, each job followed until settled).

    .venv/bin/python -m bench.tracker_cpu [--kind slurm_ssh] [-c 8] [-n 300] [--idle 10]

``aifa-broker serve --workers 2`` with the tracker (its own process) on a fresh
PostgreSQL database; ``n`` trivial jobs are submitted through the API at
concurrency ``c``. Each process's user+system CPU (``/proc``) is read before the
submissions and again once every job is settled: the tracker settles a job only
after the scheduler's accounting has it, seconds after the last submission, so a
figure read right after the submissions misses most of its work. The processes'
idle CPU per second (measured before, for ``--idle`` seconds) is also printed, and
the per-job figure without it (what each job adds).
"""

from __future__ import annotations

import argparse
import os
import time

import sqlalchemy as sa

from bench import slurm
from bench.cpu import cpu_seconds


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(k) for k in fh.read().split()]
        except OSError:
            continue
    return out


def _labels(pids: list[int]) -> dict[int, str]:
    """The serve process's children: multiprocessing's resource tracker, then the
    tracker/background process (spawned first), then the workers."""
    labels: dict[int, str] = {}
    for pid in pids:
        with open(f"/proc/{pid}/cmdline") as fh:
            if "resource_tracker" in fh.read():
                labels[pid] = "resource tracker"
                continue
        labels[pid] = "tracker process" if "tracker process" not in labels.values() else "worker"
    return labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="slurm_ssh", choices=["slurm_ssh", "slurm_rest"])
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured first")
    args = ap.parse_args()
    reason = slurm.cluster_unavailable()
    if reason:
        raise SystemExit(f"skipped: {reason}")
    ids: list[str] = []
    with slurm.slurm_broker(args.kind, workers=2, tracker=True) as b:
        engine = sa.create_engine(b["url"])

        def unsettled() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT count(*) FROM jobs WHERE settled_at IS NULL")).scalar() or 0)

        try:
            ids += slurm._broker_rate(b, n=8, concurrency=2)[2]  # warm the workers
            while unsettled():
                time.sleep(0.5)
            pids = _children(b["proc"].pid)
            before = {p: cpu_seconds(p) for p in pids}
            time.sleep(args.idle)
            idle = {p: (cpu_seconds(p) - before[p]) / args.idle for p in pids}
            start = {p: cpu_seconds(p) for p in pids}
            t0 = time.monotonic()
            rate, p50, done = slurm._broker_rate(b, n=args.n, concurrency=args.concurrency)
            ids += done
            while unsettled():
                time.sleep(0.2)
            window = time.monotonic() - t0
        finally:
            engine.dispose()
        print(f"{args.n} jobs at c={args.concurrency}: {rate:.1f} submissions/s, p50 {p50:.1f} ms; "
              f"all settled {window:.1f} s after the first submission")
        labels = _labels(pids)
        for p in pids:
            used = cpu_seconds(p) - start[p]
            print(f"  {p} {labels[p]}: {used * 1000 / args.n:.2f} ms CPU per job; idle {idle[p] * 1000:.1f} ms/s; "
                  f"without idle: {(used - idle[p] * window) * 1000 / args.n:.2f} ms per job")
    slurm.scancel(ids)


if __name__ == "__main__":
    main()
