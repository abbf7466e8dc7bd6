"""Profile the broker under submission load: py-spy on a live server (noop adapter).

    .venv/bin/python -m bench.profile_submit [--seconds 15] [--out /tmp/submit.txt]

Prints the functions holding the most samples (inclusive), for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from bench.admission import PROJECT, noop_broker
from bench.loadgen import run_for


def summarize(raw_path: str, top: int) -> list[tuple[float, str]]:
    inclusive: Counter[str] = Counter()
    total = 0
    with open(raw_path) as fh:
        for line in fh:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            seen = set()
            for frame in stack.split(";"):
                name = frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                if name not in seen:
                    inclusive[name] += n
                    seen.add(name)
    return [(v / total * 100, k) for k, v in inclusive.most_common(top)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--out", default="/tmp/aifa-submit-profile.txt")
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--gil", action="store_true", help="only samples holding the GIL (CPU, not waits)")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    body = {"project": PROJECT, "cluster": "noop", "script": "true", "time_limit_minutes": 5}
    with noop_broker("postgresql", workers=1) as b:
        head = {"Authorization": f"Bearer {b['token']}"}
        load = threading.Thread(target=run_for, args=(b["base"], lambda i: ("POST", "/v1/jobs", head, body)),
                                kwargs={"concurrency": 8, "seconds": args.seconds + 4})
        load.start()
        subprocess.run([spy, "record", "-p", str(b["proc"].pid), "-d", str(int(args.seconds)), "-r", "200",
                        "-f", "raw", "-o", args.out, *(["--gil"] if args.gil else [])], check=True, capture_output=True)
        load.join()
    for pct, name in summarize(args.out, args.top):
        print(f"{pct:5.1f}%  {name}")


if __name__ == "__main__":
    main()
