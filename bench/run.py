"""``make bench``: B1–B8 of issue 13, each against its raw baseline in the same run.

    .venv/bin/python -m bench.run [--only B3,B8] [--runs 3] [--quick]

Prints one line per figure (value, raw baseline, ratio, target met or not) and
writes bench/out/bench-<time>.json. B1/B2/B4 need the 22.05 dev cluster
(deploy/slurm-dev) and are skipped, with the reason, without it.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench import admission, reads, reports, slurm, tracking
from bench.harness import STEAL_WARNING_PCT, Figure, cpu_times, host_share, machine, write_json


def plan(runs: int, quick: bool, held: int, release: str = slurm.RELEASE) -> dict[str, Callable[[], list[Figure]]]:
    n = 150 if quick else 400
    levels = (1, 8) if quick else (1, 8, 32)
    per_point = 30 if quick else 60
    return {
        "B1": lambda: slurm.submit_figures("slurm_ssh", runs=runs, n=per_point, levels=levels, workers=2),
        "B2": lambda: slurm.submit_figures("slurm_rest", runs=runs, n=per_point, levels=levels, workers=2),
        "B4": lambda: tracking.b4_b7(held=held, cycles=max(runs, 1), release=release),
        "B5": lambda: reads.b5(seconds=15 if quick else 60),
        "B6": lambda: reports.b6(runs=runs, rows=200_000 if quick else 1_000_000),
        # 2,000 submissions a run: ~4 s of the broker's load and ~1.3 s of the bare endpoint's
        # (400 measured under 1 s and 0.25 s, where a connection's start or one scheduling
        # hiccup of the host moved the ratio by ±0.1)
        "B3": lambda: [admission.b3(runs=runs, n=n if quick else 2000, concurrency=16, workers=2)],
        "B8": lambda: [admission.b8(runs=runs, n=n, concurrency=c) for c in (1, 8)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated ids, e.g. B3,B8 (default: all)")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median reported)")
    ap.add_argument("--quick", action="store_true", help="fewer requests per run (a smoke test)")
    ap.add_argument("--held", type=int, default=2000, help="B4/B7: held jobs on the dev cluster")
    ap.add_argument("--release", default=slurm.RELEASE, help="B4/B7: which dev cluster (22.05, 24.11, 26.05)")
    args = ap.parse_args(argv)
    steps = plan(args.runs, args.quick, args.held, args.release)
    wanted = [x.strip().upper() for x in args.only.split(",") if x.strip()] or list(steps)
    meta: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    figures: list[Figure] = []
    for key in wanted:
        if key not in steps:
            print(f"unknown benchmark {key}; known: {', '.join(steps)}")
            return 2
        before = cpu_times()
        try:
            got = steps[key]()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            got = [Figure(key, "benchmark", "", "", failed=f"{type(exc).__name__}: {exc}")]
        host = host_share(before, cpu_times())
        for fig in got:
            fig.extra["host"] = host
            print(fig.line(), flush=True)
        if host:
            warn = ""
            if host["steal_pct"] > STEAL_WARNING_PCT:
                warn = (f" — above {STEAL_WARNING_PCT:g} %: the hypervisor took CPU from this guest, "
                        "these figures are not comparable with a quiet run's")
            print(f"{key:4s} host CPU during it: busy {host['busy_pct']} %, idle {host['idle_pct']} %, "
                  f"steal {host['steal_pct']} %{warn}", flush=True)
        figures.extend(got)
    path = write_json("bench", figures, meta)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
