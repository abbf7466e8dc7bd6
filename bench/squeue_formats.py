"""``squeue --json`` vs the poll's text format (``squeue --Format``) on a dev cluster
with many held jobs: squeue's own time on the controller, bytes, the round trip over
the ``slurm_ssh`` adapter's pooled SSH connection, and the parse in Python.

    .venv/bin/python -m bench.squeue_formats --release 22.05 --held 2000 [--runs 3]

Submits ``--held`` jobs as alice with ``sbatch --hold`` (they never run) and cancels
all of them at the end, whatever happens. The dev clusters' MaxJobCount is 10,000 and
other people test on them: keep the window short and run one release at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from typing import Any

from bench.harness import ROOT

RUN_IN = ROOT / "deploy" / "slurm-dev" / "run-in"


def run_in(release: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RUN_IN), release, *argv], input=stdin, capture_output=True, text=True,
                          timeout=1800, check=False)


def submit_held(release: str, n: int) -> list[str]:
    """``n`` held jobs as alice (4 sbatch at a time, one shell on the controller)."""
    loop = (f"seq {int(n)} | xargs -P 4 -I@ sbatch --hold --parsable --partition=cpu --account=proj-a "
            "--time=1 --job-name=bench-squeue.@ --output=/dev/null --wrap=true")
    done = run_in(release, "runuser", "-u", "alice", "--", "sh", "-c", loop)
    ids = [line.split(";")[0] for line in done.stdout.split() if line.split(";")[0].isdigit()]
    if done.returncode != 0 and not ids:
        raise RuntimeError(done.stderr[-2000:])
    return ids


def cancel(release: str, ids: list[str]) -> None:
    for i in range(0, len(ids), 500):
        run_in(release, "runuser", "-u", "alice", "--", "scancel", *ids[i:i + 500])


def median_of(runs: int, fn: Callable[[], Any]) -> tuple[float, float, float, Any]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def measure(release: str, held: int, runs: int) -> dict[str, Any]:
    from adapters.slurm_ssh import commands, parse
    from broker import plugins

    with open(ROOT / "deploy" / "slurm-dev" / "generated" / release / "slurm_ssh.toml", "rb") as fh:
        doc = tomllib.load(fh)
    # the JSON of a big 22.05 queue passes the default 16 MiB cap (the poll then fails): lift it here
    connection = {**doc["connection"], "max_output_bytes": 512 * 1024 * 1024}
    adapter = plugins.load_adapter_class("slurm_ssh")(doc["name"], connection,
                                                      data_dir=tempfile.mkdtemp(prefix="aifa-bench-sq-"))
    result: dict[str, Any] = {"release": release, "held": held}
    ids: list[str] = []
    try:
        t0 = time.perf_counter()
        ids = submit_held(release, held)
        result["submit_s"] = time.perf_counter() - t0
        result["submitted"] = len(ids)
        result["queue_records"] = len(run_in(release, "squeue", "-h", "-a", "-t", "all", "-o", "%i").stdout.split())
        mark = "0123456789abcdef"
        whole_text = commands.build_squeue_poll([], mark)
        poll_text = f"{whole_text} --jobs={','.join(sorted(ids, key=int))}"  # squeue's own filter, any count
        json_text = "squeue --json" if release == "22.05" else f"squeue --json --jobs={','.join(ids)}"
        over_ssh = {"json": json_text, "text --jobs": poll_text, "text whole queue": whole_text}
        for name, command in over_ssh.items():  # squeue alone on the controller, output to a file
            shell = f"{command} > /tmp/aifa-bench-sq.out; wc -c < /tmp/aifa-bench-sq.out"
            med, lo, hi, out = median_of(runs, lambda s=shell: run_in(release, "sh", "-c", s))
            result[f"controller {name} s"] = (med, lo, hi)
            result[f"controller {name} bytes"] = int(out.stdout.strip() or 0)
        user = adapter._query_user()
        outputs: dict[str, str] = {}
        for name, command in over_ssh.items():  # the same over the adapter's pooled SSH connection
            adapter._run(user, command)  # warm the connection
            med, lo, hi, out = median_of(runs, lambda c=command: adapter._run(user, c))
            assert out.ok, out.stderr
            outputs[name] = out.stdout
            result[f"ssh {name} s"] = (med, lo, hi)
            result[f"ssh {name} bytes"] = len(out.stdout.encode())
        med, lo, hi, jobs = median_of(runs, lambda: parse.parse_squeue_json(outputs["json"]))
        result["parse json s"] = (med, lo, hi)
        result["parse json jobs"] = len(jobs)
        med, lo, hi, (jobs, skipped) = median_of(runs, lambda: parse.parse_squeue_poll(outputs["text --jobs"], mark))
        result["parse text s"] = (med, lo, hi)
        result["parse text jobs"] = len(jobs)
        result["parse text skipped"] = skipped
        med, lo, hi, _ = median_of(runs, lambda: adapter._queue_jobs(user, set(ids)))
        result["adapter _queue_jobs s (as polled: ssh + parse)"] = (med, lo, hi)
    finally:
        cancel(release, ids)
        adapter.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", default="22.05")
    ap.add_argument("--held", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(measure(args.release, args.held, args.runs), indent=1))


if __name__ == "__main__":
    main()
