"""The adapters' share of a submission: the broker server's CPU per submission
through a real adapter against the 22.05 dev cluster, next to the ``noop`` adapter's.

    .venv/bin/python -m bench.adapter_cpu [--n 300] [--concurrency 8] [--kinds noop,slurm_rest,slurm_ssh]

Each kind is served by ONE process (``--workers 1``, tracker off) on a fresh
PostgreSQL database; the CPU is read from ``/proc/<pid>/stat`` around ``n``
submissions (as bench/cpu.py). The difference to ``noop`` is what the adapter
costs the server per job: its own work plus the effect of waiting for the
scheduler. The kinds are measured in turn: on a shared host, repeat and compare
neighbours. Jobs still queued at the end are cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import AbstractContextManager
from typing import Any

from bench import admission, slurm
from bench.cpu import cpu_seconds
from bench.loadgen import run_load


def _broker(kind: str) -> AbstractContextManager[dict[str, Any]]:
    if kind == "noop":
        return admission.noop_broker("postgresql", workers=1)
    return slurm.slurm_broker(kind, workers=1, tracker=False)


def measure(kind: str, *, n: int, concurrency: int) -> dict[str, Any]:
    """CPU µs per submission of the server, the rate and the p50 for ``kind``."""
    ids: list[str] = []
    with _broker(kind) as b:
        head = {"Authorization": f"Bearer {b['token']}"}
        project = admission.PROJECT if kind == "noop" else slurm.PROJECT
        body = {"project": project, "cluster": b.get("cluster", "noop"), "script": slurm.SCRIPT,
                "time_limit_minutes": 1, "partition": "cpu", "name": "bench"}
        reqs: list[Any] = [("POST", "/v1/jobs", head, body)]
        ids += _ids(run_load(b["base"], reqs * 20, concurrency=concurrency, keep_bodies=True).bodies)
        before = cpu_seconds(b["proc"].pid)
        res = run_load(b["base"], reqs * n, concurrency=concurrency, keep_bodies=True)
        used = cpu_seconds(b["proc"].pid) - before
        assert res.errors() == 0, (res.statuses, res.bodies[:1])
        ids += _ids(res.bodies)
    if kind != "noop":
        slurm.scancel(ids)
    return {"cpu_us": round(used / n * 1e6), "rate": round(res.rate, 1), "p50_ms": round(res.p50_ms, 1),
            "loadavg": [round(x, 1) for x in os.getloadavg()]}


def _ids(bodies: list[bytes]) -> list[str]:
    return [str(json.loads(x).get("scheduler_job_id")) for x in bodies]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--kinds", default="noop,slurm_rest,slurm_ssh")
    args = ap.parse_args()
    reason = slurm.cluster_unavailable()
    for kind in args.kinds.split(","):
        if kind != "noop" and reason:
            print(f"{kind:10s} skipped: {reason}", flush=True)
            continue
        print(f"{kind:10s} {json.dumps(measure(kind, n=args.n, concurrency=args.concurrency))}", flush=True)


if __name__ == "__main__":
    main()
