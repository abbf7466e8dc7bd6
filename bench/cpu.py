"""The broker's own CPU per request: the honest figure on a shared, loaded machine.

    .venv/bin/python -m bench.cpu [--db postgresql] [--n 600] [--concurrency 4]

Serves the real app in ONE process (``--workers 1``, noop adapter, tracker off),
sends ``n`` requests of each kind over keep-alive connections and reads the
server process's user+system CPU time from ``/proc/<pid>/stat`` before and after:
CPU µs per request, independent of how much CPU other tenants leave the broker.
The bare FastAPI endpoint doing one query (B3's baseline) is measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os

from bench.admission import PROJECT, noop_broker
from bench.harness import PY, free_port, server
from bench.loadgen import Request, run_load

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def per_request(base: str, pid: int, reqs: list[Request], *, concurrency: int) -> dict[str, float]:
    """CPU µs per request and the answers' rate for ``reqs`` (after a short warm-up)."""
    run_load(base, reqs[: max(20, len(reqs) // 10)], concurrency=concurrency)
    c0 = cpu_seconds(pid)
    res = run_load(base, reqs, concurrency=concurrency)
    used = cpu_seconds(pid) - c0
    assert res.errors() == 0, res.statuses
    return {"cpu_us": round(used / len(reqs) * 1e6), "rate": round(res.rate, 1), "p50_ms": round(res.p50_ms, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="postgresql")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated kinds (default: all)")
    args = ap.parse_args()
    only = {k for k in args.only.split(",") if k}
    body = {"project": PROJECT, "cluster": "noop", "script": "true", "time_limit_minutes": 5}
    out: dict[str, dict[str, float]] = {}
    n, c = args.n, args.concurrency
    with noop_broker(args.db, workers=1) as b:
        head = {"Authorization": f"Bearer {b['token']}"}
        pid = b["proc"].pid
        made = run_load(b["base"], [("POST", "/v1/jobs", head, body)] * 40, concurrency=4, keep_bodies=True)
        job = json.loads(made.bodies[0])["id"]
        kinds: dict[str, list[Request]] = {
            "submit": [("POST", "/v1/jobs", head, body)] * n,
            "estimate": [("POST", "/v1/jobs/estimate", head, body)] * n,
            "job": [("GET", f"/v1/jobs/{job}", head, None)] * n,
            "jobs": [("GET", "/v1/jobs?limit=20", head, None)] * n,
            "projects": [("GET", "/v1/projects", head, None)] * n,
            "usage": [("GET", f"/v1/projects/{PROJECT}/usage", head, None)] * n,
        }
        for kind, reqs in kinds.items():
            if only and kind not in only:
                continue
            out[kind] = per_request(b["base"], pid, reqs, concurrency=c)
            print(f"{kind:10s} {out[kind]}", flush=True)
        if not only or "bare" in only:
            port = free_port()
            with server([PY, "-m", "bench.bare", "--port", str(port), "--workers", "1"], b["env"], port) as bare:
                out["bare"] = per_request(f"http://127.0.0.1:{port}", bare.pid,
                                          [("POST", "/bare", head, body)] * n, concurrency=c)
                print(f"{'bare':10s} {out['bare']}", flush=True)
    print(json.dumps({"loadavg": os.getloadavg(), **out}))


if __name__ == "__main__":
    main()
