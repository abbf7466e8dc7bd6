"""Shared pieces of ``make bench``: figures, medians, servers as subprocesses, JSON output."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PY = sys.executable


@dataclass
class Figure:
    """One benchmark's outcome: the broker's figure against the raw baseline of the same run."""

    id: str
    what: str
    unit: str
    target: str
    runs: list[float] = field(default_factory=list)
    baseline_runs: list[float] = field(default_factory=list)
    min_ratio: float | None = None  # target as a ratio to the baseline (None: absolute target)
    max_value: float | None = None  # absolute target: the value must stay at or below
    min_value: float | None = None  # absolute target: the value must reach
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    failed: str | None = None

    @property
    def value(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None

    @property
    def baseline(self) -> float | None:
        return statistics.median(self.baseline_runs) if self.baseline_runs else None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.skipped or self.failed or self.value is None:
            return None
        ok = True
        if self.min_ratio is not None:
            ok = ok and self.ratio is not None and self.ratio >= self.min_ratio
        if self.max_value is not None:
            ok = ok and self.value <= self.max_value
        if self.min_value is not None:
            ok = ok and self.value >= self.min_value
        return ok

    def line(self) -> str:
        if self.skipped:
            return f"{self.id:4s} {self.what}: SKIPPED — {self.skipped}"
        if self.failed:
            return f"{self.id:4s} {self.what}: FAILED — {self.failed}"
        spread = f" (runs {', '.join(f'{r:.4g}' for r in self.runs)})" if len(self.runs) > 1 else ""
        text = f"{self.id:4s} {self.what}: {self.value:.4g} {self.unit}{spread}"
        if self.baseline is not None:
            text += f" | raw {self.baseline:.4g} {self.unit} | ratio {self.ratio:.2f}"
        verdict = {True: "met", False: "NOT met", None: "?"}[self.met]
        return f"{text} | target {self.target}: {verdict}"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(value=self.value, baseline=self.baseline, ratio=self.ratio, met=self.met)
        return data


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    load = os.getloadavg()
    return {"host": platform.node(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": [round(x, 2) for x in load]}


def cpu_times() -> list[int]:
    """The host's CPU time counters (``/proc/stat``'s ``cpu`` line, in ticks), or [] off Linux."""
    try:
        with open("/proc/stat") as fh:
            return [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return []


STEAL_WARNING_PCT = 5.0  # above this, a figure measured the host's neighbours as much as the broker


def host_share(before: list[int], after: list[int]) -> dict[str, float]:
    """How the host's CPU time went between two :func:`cpu_times` readings: busy
    (user+system), idle and **steal** (time the hypervisor gave the vCPUs to other
    guests) in percent. Ratios within one run compare like with like only while steal
    stays small: a burst of steal slows whichever side is running at that moment."""
    if len(before) < 8 or len(after) < 8:
        return {}
    delta = [b - a for a, b in zip(before, after, strict=False)]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    total = sum(delta[:8]) or 1
    idle = delta[3] + delta[4]
    return {"busy_pct": round(100 * (total - idle - delta[7]) / total, 1),
            "idle_pct": round(100 * idle / total, 1), "steal_pct": round(100 * delta[7] / total, 1)}


def write_json(name: str, figures: list[Figure], meta: dict[str, Any]) -> Path:
    """bench/out/<name>-<utc time>.json (and <name>-latest.json)."""
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    doc = {"meta": meta, "figures": [f.as_json() for f in figures]}
    path = OUT / f"{name}-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    (OUT / f"{name}-latest.json").write_text(json.dumps(doc, indent=2, default=str))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(argv: list[str], env: dict[str, str], port: int, *, ready_path: str = "/healthz",
           timeout: float = 120, workers: int = 1) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` (a server listening on ``port``) until the block ends; with
    ``workers`` > 1, until that many processes listen on the port (see
    :func:`listening_processes`)."""
    log = open(env.get("AIFA_BENCH_LOG", os.devnull), "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=ROOT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200 \
                        and (workers <= 1 or listening_processes(port) >= workers):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {argv} did not start (exit {proc.poll()})")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def listening_processes(port: int) -> int:
    """How many processes have a listening socket on ``port``. A ``--workers N`` server
    answers /healthz as soon as its first worker listens; a worker still starting (a
    loaded machine) is not yet in the ``SO_REUSEPORT`` group, and the connections a
    benchmark opens meanwhile all go, for good (keep-alive), to the workers already
    listening: B5 once measured 500 connections on one of two workers."""
    out = subprocess.run(["ss", "-tlnpH", f"( sport = :{port} )"], capture_output=True, text=True,
                         check=True).stdout
    return len(set(re.findall(r"pid=(\d+)", out)))


def repeat(runs: int, fn: Callable[[int], Any]) -> list[Any]:
    """``fn(i)`` for each run, in order."""
    return [fn(i) for i in range(runs)]
