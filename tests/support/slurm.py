"""Dev Slurm clusters for tests: which are up, their definitions, running commands.

A release's tests skip with the reason (and the command that fixes it) when its
cluster is not up — unless CI requires it (``AIFA_REQUIRE_SLURM=1`` and the release
is listed in ``AIFA_REQUIRED_SLURM_RELEASES``), where a missing cluster fails."""

from __future__ import annotations

import os
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / "deploy" / "slurm-dev"
RELEASES = ("22.05", "24.11", "26.05")
#: the Slurm account of the end-to-end tests' projects (alice and bob): their own, so the
#: usage import never reads other tests' or benchmarks' leftover accounting in proj-a
E2E_ACCOUNT = "aifa-e2e"
ADAPTERS = ("slurm_ssh", "slurm_rest")


def definition(release: str, adapter: str) -> dict[str, Any]:
    path = DEV / "generated" / release / f"{adapter}.toml"
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    data.pop("slurm_release", None)
    # cluster-wide queries (poll, discovery, usage import) need a reader account
    data.setdefault("connection", {}).setdefault("query_username", "alice")
    return data


def require_cluster(release: str) -> None:
    """Skip (or fail in CI) unless the ``release`` dev cluster answers."""
    reason = None
    if not (DEV / "generated" / release / "slurm_ssh.toml").exists():
        reason = f"Slurm {release} dev cluster was never brought up (make slurm-up SLURM_RELEASE={release})"
    else:
        # a daemon restarted by a test (slurmctld down → UNKNOWN) takes a few seconds to
        # answer again: look a few times before calling the cluster not running
        for attempt in range(4):
            done = subprocess.run([str(DEV / "status.sh"), release], capture_output=True, text=True,
                                  check=False)
            if done.returncode == 0:
                break
            if attempt < 3:
                time.sleep(3)
        if done.returncode != 0:
            status = " ".join(done.stdout.split())
            reason = (f"Slurm {release} dev cluster is not running (make slurm-up SLURM_RELEASE={release}); "
                      f"status: {status}")
    if reason is None:
        return
    required = os.environ.get("AIFA_REQUIRED_SLURM_RELEASES", "22.05 24.11 26.05").split()
    if os.environ.get("AIFA_REQUIRE_SLURM") == "1" and release in required:
        pytest.fail(reason)
    pytest.skip(reason)


def run_in(release: str, *argv: str, check: bool = True) -> str:
    """Run a Slurm command as root against the release's cluster."""
    done = subprocess.run([str(DEV / "run-in"), release, *argv], capture_output=True, text=True,
                          check=False, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def ctl(release: str, action: str) -> None:
    subprocess.run([str(DEV / "ctl.sh"), release, action], check=True, capture_output=True, timeout=120)


def sacct_job(release: str, job_id: str) -> dict[str, str]:
    """One job's allocation line from sacct (-X: the job, not its steps)."""
    fields = "JobID,User,Account,State,ExitCode,ElapsedRaw,AllocTRES,Partition"
    out = run_in(release, "sacct", "-X", "-n", "-P", "-j", job_id, "-o", fields)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines:
        return {}
    return dict(zip(fields.split(","), lines[0].split("|"), strict=True))


def tres(alloc_tres: str) -> dict[str, float]:
    """``cpu=2,mem=100M,node=1,billing=2,gres/gpu=1`` → counts (mem in MB)."""
    out: dict[str, float] = {}
    for part in filter(None, alloc_tres.split(",")):
        name, _, value = part.partition("=")
        scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}.get(value[-1:], None)
        out[name] = float(value[:-1]) * scale if scale is not None else float(value)
    return out


def params() -> list[Any]:
    """(release, adapter) pairs as pytest params with the ``slurm`` marker."""
    return [pytest.param((r, a), id=f"{a}-{r}", marks=pytest.mark.slurm) for r in RELEASES for a in ADAPTERS]


def ensure_account(release: str, account: str, users: tuple[str, ...]) -> None:
    """A Slurm account of the release's cluster with ``users`` associated (idempotent):
    for tests whose accounting must not mix with the shared ``proj-a``/``proj-b``."""
    listed = run_in(release, "sacctmgr", "-nP", "show", "account", account, "format=account")
    if account not in listed.split():
        run_in(release, "sacctmgr", "-i", "add", "account", account, "description=aifa test account",
               "organization=aifa-dev")
    for user in users:
        assoc = run_in(release, "sacctmgr", "-nP", "show", "assoc", f"user={user}", f"account={account}",
                       "format=account")
        if account not in assoc.split():
            run_in(release, "sacctmgr", "-i", "add", "user", user, f"account={account}")


def burst(release: str, user: str, accounts: dict[str, int], *, settle_seconds: float = 3) -> list[str]:
    """A burst of direct jobs ending in the same second: ``count`` jobs per account
    submitted as ``user`` (the node's CPUs run some, the rest wait), all cancelled by
    one ``scancel`` once the running ones have run ``settle_seconds``; returns their ids
    once accounting shows every one ended. Bounded: the jobs are gone when it returns."""
    ids: list[str] = []
    try:
        for account, count in accounts.items():
            for _ in range(count):
                out = run_in(release, "sbatch", "--parsable", f"--uid={user}", f"--account={account}",
                             "--partition=cpu", "--time=5", "--job-name=aifa-burst", "--wrap=sleep 300",
                             "-o", "/dev/null")
                ids.append(out.strip().split(";")[0])
        time.sleep(settle_seconds)
    finally:
        if ids:
            run_in(release, "scancel", *ids, check=False)
    deadline = time.monotonic() + 120
    while True:
        out = run_in(release, "sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,State,End")
        ended = {f[0] for f in (ln.split("|") for ln in out.splitlines()) if len(f) == 3
                 and f[1].startswith("CANCELLED") and f[2] not in ("", "Unknown")}
        if ended >= set(ids):
            return ids
        assert time.monotonic() < deadline, f"burst not accounted: {sorted(set(ids) - ended)}"
        time.sleep(1)
