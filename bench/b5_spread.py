"""Where B5's latency spread comes from: B5's load (``bench.reads.read_mix``, the
noop broker, PostgreSQL) with the latencies split by kind of request, by worker
process and by 5 s window, and the workers' CPU per answer (from ``/proc``: less
sensitive to the rest of the machine than latency, for before/after comparisons).

    PYTHONPATH=. .venv/bin/python -m bench.b5_spread [--seconds 30] [--clients 500] [--workers 2]

The workers each connection landed on are read with ``ss`` once every connection is
open (``SO_REUSEPORT`` spreads them by a hash of the addresses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import time
from collections import defaultdict
from urllib.parse import urlsplit

from bench.admission import PROJECT, noop_broker
from bench.loadgen import Request, run_load
from bench.reads import read_mix

Record = tuple[str, int, float, float, int]  # kind, connection, start, seconds, status


def _kind(path: str) -> str:
    if path.startswith("/v1/jobs?"):
        return "list"
    if path.startswith("/v1/jobs/"):
        return "job"
    return "usage" if path.endswith("/usage") else "projects"


def _pids_by_client_port(port: int) -> dict[int, int]:
    """Client port → pid of the server process holding the other end."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        pid = re.search(r"pid=(\d+)", line)
        if pid:
            found[int(line.split()[3].rsplit(":", 1)[1])] = int(pid.group(1))
    return found


async def _load(base: str, mix: list[Request], clients: int, seconds: float) -> tuple[list[Record], list[int], float]:
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    conns = [await asyncio.open_connection(host, port) for _ in range(clients)]
    by_port = _pids_by_client_port(port)
    conn_pid = [by_port.get(w.get_extra_info("sockname")[1], 0) for _, w in conns]
    records: list[Record] = []
    queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=clients * 2)
    stop_at = time.perf_counter() + seconds

    async def feed() -> None:  # the same shared queue as bench.loadgen.run_for
        i = 0
        while time.perf_counter() < stop_at:
            await queue.put(mix[i % len(mix)])
            i += 1
        for _ in range(clients):
            await queue.put(None)

    async def client(ci: int) -> None:
        reader, writer = conns[ci]
        while (item := await queue.get()) is not None:
            method, path, headers, _ = item
            head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Length: 0",
                    *(f"{k}: {v}" for k, v in headers.items())]
            t0 = time.perf_counter()
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            records.append((_kind(path), ci, t0, time.perf_counter() - t0, status))
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(feed(), *(client(i) for i in range(clients)))
    return records, conn_pid, time.perf_counter() - t0


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def _line(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100) if len(values) > 2 else [values[0]] * 99
    return f"n={len(values)} p50={q[49] * 1000:.0f} p95={q[94] * 1000:.0f} mean={statistics.mean(values) * 1000:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    body = {"project": PROJECT, "cluster": "noop", "script": "true", "time_limit_minutes": 5}
    with noop_broker("postgresql", workers=args.workers) as b:
        head = {"Authorization": f"Bearer {b['token']}"}
        made = run_load(b["base"], [("POST", "/v1/jobs", head, body)] * 40, concurrency=4, keep_bodies=True)
        mix = read_mix(head, [json.loads(x)["id"] for x in made.bodies])
        found = subprocess.run(["pgrep", "-P", str(b["proc"].pid), "-f", "spawn_main"], capture_output=True,
                               text=True).stdout.split()
        workers = [int(p) for p in found] if args.workers > 1 else [b["proc"].pid]
        cpu0 = _cpu_seconds(workers)
        records, conn_pid, wall = asyncio.run(_load(b["base"], mix, args.clients, args.seconds))
        cpu = _cpu_seconds(workers) - cpu0
    statuses: dict[int, int] = defaultdict(int)
    for r in records:
        statuses[r[4]] += 1
    print(f"{len(records) / wall:.0f} answers/s {dict(statuses)}; all {_line([r[3] for r in records])}")
    print(f"workers' CPU {cpu:.1f} s: {cpu / len(records) * 1e6:.0f} µs per answer")
    for kind in ("job", "list", "projects", "usage"):
        print(f"  {kind:9s} {_line([r[3] for r in records if r[0] == kind])}")
    for pid in sorted(set(conn_pid)):
        print(f"  worker {pid} ({conn_pid.count(pid)} connections) "
              f"{_line([r[3] for r in records if conn_pid[r[1]] == pid])}")
    first = min(r[2] for r in records)
    windows: dict[int, list[float]] = defaultdict(list)
    for r in records:
        windows[int((r[2] - first) // 5)].append(r[3])
    for w, values in sorted(windows.items()):
        print(f"  {w * 5:3d}-{w * 5 + 5:3d} s {_line(values)}")


if __name__ == "__main__":
    main()
