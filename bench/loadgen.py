"""A small HTTP/1.1 load generator (asyncio streams, keep-alive, no client library).

The client must cost far less than the server under test, or a fast baseline
would measure the client: httpx spends ~1 ms of CPU per request, this ~0.1 ms.
Only what the benchmarks send is supported: JSON bodies, Content-Length answers.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    """Throughput and latency of one load run."""

    requests: int
    wall_s: float
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000 if self.latencies_s else 0.0

    @property
    def p95_ms(self) -> float:
        if len(self.latencies_s) < 2:
            return self.p50_ms
        return statistics.quantiles(self.latencies_s, n=20)[18] * 1000

    def errors(self, ok: tuple[int, ...] = (200, 201, 202)) -> int:
        return sum(n for code, n in self.statuses.items() if code not in ok)


Request = tuple[str, str, dict[str, str], Any]  # method, path, headers, json body or None


async def _one_connection(host: str, port: int, jobs: asyncio.Queue[Request | None],
                          result: LoadResult, keep_bodies: bool) -> None:
    """Send queued requests one after the other on one keep-alive connection. A
    connection the server drops counts one error (status 0) and is reopened."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while (item := await jobs.get()) is not None:
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                if not await _exchange(conn, host, port, item, result, keep_bodies):
                    conn[1].close()
                    conn = None
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                result.statuses[0] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
    finally:
        if conn is not None:
            conn[1].close()


async def _exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str, port: int,
                    item: Request, result: LoadResult, keep_bodies: bool) -> bool:
    """One request and its answer; False when the connection must not be reused."""
    reader, writer = conn
    method, path, headers, body = item
    raw = b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(raw)}"]
    if body is not None:
        head.append("Content-Type: application/json")
    head += [f"{k}: {v}" for k, v in headers.items()]
    t0 = time.perf_counter()
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + raw)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("the server closed the connection")
    status = int(status_line.split()[1])
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            close = True
    payload = await reader.readexactly(length) if length else b""
    result.latencies_s.append(time.perf_counter() - t0)
    result.statuses[status] += 1
    if keep_bodies:
        result.bodies.append(payload)
    return not close


async def _run(base: str, requests: list[Request], concurrency: int, keep_bodies: bool) -> LoadResult:
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    queue: asyncio.Queue[Request | None] = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    for _ in range(concurrency):
        queue.put_nowait(None)
    result = LoadResult(requests=len(requests), wall_s=0.0)
    t0 = time.perf_counter()
    await asyncio.gather(*(_one_connection(host, port, queue, result, keep_bodies)
                           for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - t0
    return result


def run_load(base: str, requests: list[Request], *, concurrency: int, keep_bodies: bool = False) -> LoadResult:
    """Send ``requests`` over ``concurrency`` keep-alive connections; wait for every answer."""
    return asyncio.run(_run(base, requests, concurrency, keep_bodies))


def run_for(base: str, make: Callable[[int], Request], *, concurrency: int, seconds: float) -> LoadResult:
    """Keep ``concurrency`` connections busy for ``seconds`` with ``make(i)`` requests."""

    async def main() -> LoadResult:
        parts = urlsplit(base)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        result = LoadResult(requests=0, wall_s=0.0)
        queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=concurrency * 2)
        stop_at = time.perf_counter() + seconds

        async def feed() -> None:
            i = 0
            while time.perf_counter() < stop_at:
                await queue.put(make(i))
                i += 1
            for _ in range(concurrency):
                await queue.put(None)

        t0 = time.perf_counter()
        await asyncio.gather(feed(), *(_one_connection(host, port, queue, result, False)
                                       for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - t0
        result.requests = sum(result.statuses.values())
        return result

    return asyncio.run(main())
