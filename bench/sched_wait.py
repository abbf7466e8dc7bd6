"""Where a B1/B2 job's time goes on a shared host: per process group, the time on a CPU
and the time **waiting for** a CPU (``/proc/*/task/*/schedstat``), per job, for the raw
scheduler path and through the broker, alternated.

    PYTHONPATH=. .venv/bin/python -m bench.sched_wait [--kind slurm_ssh] [-c 8] [-n 300]

Why: at c >= 8 on the 2-vCPU host the broker's PostgreSQL statements took several ms of
wall time for well under 1 ms of CPU; this shows the run-queue waits behind sshd,
``sbatch`` and the broker's own threads (bench/RESULTS.md, eighth pass). Short-lived
processes (sshd's session children, the login shell, ``sbatch``) end between the
readings and are not counted: they are the same work on both sides.
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import tempfile
from collections.abc import Callable

from bench import slurm

Group = Callable[[str, str], bool]  # (pid, comm) -> belongs


def _sched(belongs: Group) -> tuple[float, float]:
    """Seconds on a CPU and waiting for one, summed over the threads of matching processes."""
    on_cpu = waiting = 0
    for path in glob.glob("/proc/[0-9]*/task/[0-9]*/schedstat"):
        pid = path.split("/")[2]
        try:
            with open(f"/proc/{pid}/comm") as fh:
                comm = fh.read().strip()
            if not belongs(pid, comm):
                continue
            with open(path) as fh:
                run_ns, wait_ns, _ = fh.read().split()
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        on_cpu += int(run_ns)
        waiting += int(wait_ns)
    return on_cpu / 1e9, waiting / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="slurm_ssh", choices=("slurm_ssh", "slurm_rest"))
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("-n", type=int, default=300, help="jobs per side per round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if reason := slurm.cluster_unavailable():
        raise SystemExit(f"needs the dev cluster: {reason}")
    from broker import plugins

    doc = slurm.definition(args.kind)
    adapter = plugins.load_adapter_class(args.kind)(doc["name"], doc["connection"],
                                                    data_dir=tempfile.mkdtemp(prefix="aifa-bench-raw-"))
    raw = slurm._raw_submitter(args.kind, adapter)
    c, n, ids = args.concurrency, args.n, []
    slurm.wait_for_room(args.rounds * 2 * n + 4 * c)
    try:
        with slurm.slurm_broker(args.kind, workers=2) as b:
            ids += slurm.raw_rate(raw, n=2 * c, concurrency=c)[2]
            ids += slurm._broker_rate(b, n=2 * c, concurrency=c)[2]
            children = set(subprocess.run(["pgrep", "-P", str(b["proc"].pid)], capture_output=True,
                                          text=True).stdout.split())
            groups: dict[str, Group] = {
                "broker (workers + tracker)": lambda pid, _comm: pid in children,
                "postgres": lambda _pid, comm: comm == "postgres",
                "slurmctld": lambda _pid, comm: comm == "slurmctld",
                "slurmrestd": lambda _pid, comm: comm == "slurmrestd",
            }
            for side in ("raw", "api") * args.rounds:
                before = {k: _sched(g) for k, g in groups.items()}
                if side == "raw":
                    rate, p50, got = slurm.raw_rate(raw, n=n, concurrency=c)
                else:
                    rate, p50, got = slurm._broker_rate(b, n=n, concurrency=c)
                ids += got
                after = {k: _sched(g) for k, g in groups.items()}
                parts = [f"{k}: {1000 * (after[k][0] - before[k][0]) / n:.2f} on CPU / "
                         f"{1000 * (after[k][1] - before[k][1]) / n:.2f} waiting ms per job" for k in groups]
                print(f"{side} {rate:6.1f} jobs/s p50 {p50:5.1f} ms | " + " | ".join(parts), flush=True)
    finally:
        adapter.close()
        slurm.scancel(ids)


if __name__ == "__main__":
    main()
