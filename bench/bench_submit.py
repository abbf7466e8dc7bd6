"""Benchmark: end-to-end submission throughput over HTTP (uvicorn on loopback).

Each submission authenticates, runs the eligibility chain, reserves atomically,
writes the job + ledger row, submits to the `local` adapter (spawns a detached
supervisor process) and records the scheduler id. Also measures the estimate
endpoint (everything but the reservation and the adapter).

    .venv/bin/python bench/bench_submit.py [--db sqlite|postgresql] [-n 200] [-c 16]

Results are recorded in bench/RESULTS.md. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.env import broker_env, fresh_database
from tests.support.server import live_server


def run(db: str, n: int, concurrency: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="aifa-bench-"))
    with fresh_database(db, tmp) as url, broker_env(tmp, url) as env:
        env.setup_project(amount=1e9)
        head = env.auth("alice")
        body = {"project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 5}
        out: dict[str, float] = {}
        with live_server(env.app) as base, httpx.Client(base_url=base, timeout=60,
                                                         limits=httpx.Limits(max_connections=64)) as c:
            for path, label in (("/v1/jobs/estimate", "estimate"), ("/v1/jobs", "submit")):
                latencies: list[float] = []

                def one(_: int, path: str = path, latencies: list[float] = latencies) -> int:
                    t = time.perf_counter()
                    code = c.post(path, json=body, headers=head).status_code
                    latencies.append(time.perf_counter() - t)
                    return code

                start = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    codes = list(pool.map(one, range(n)))
                wall = time.perf_counter() - start
                assert all(code in (200, 201) for code in codes), set(codes)
                out[f"{label}_per_s"] = n / wall
                out[f"{label}_p50_ms"] = statistics.median(latencies) * 1000
                out[f"{label}_p95_ms"] = statistics.quantiles(latencies, n=20)[18] * 1000
        # let the local jobs finish before the environment is torn down
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            page = env.call("GET", "/v1/jobs", env.qm, params={"state": "PENDING", "limit": 1}).json()
            running = env.call("GET", "/v1/jobs", env.qm, params={"state": "RUNNING", "limit": 1}).json()
            if not page["items"] and not running["items"]:
                break
            time.sleep(0.5)
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="sqlite", choices=["sqlite", "postgresql"])
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("-c", type=int, default=16)
    args = ap.parse_args()
    result = run(args.db, args.n, args.c)
    print(f"db={args.db} n={args.n} concurrency={args.c}")
    for key, value in result.items():
        print(f"  {key:18s} {value:8.1f}")


if __name__ == "__main__":
    main()
