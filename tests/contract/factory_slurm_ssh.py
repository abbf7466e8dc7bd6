"""Contract targets: the ``slurm_ssh`` adapter against each dev Slurm cluster.

A target exists per release whose ``deploy/slurm-dev/generated/<release>/
slurm_ssh.toml`` was written by ``make slurm-up SLURM_RELEASE=<release>``; when
the file is missing or the cluster does not answer, the target skips with the
command that starts it.
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
import tomllib
from collections.abc import Callable
from typing import Any

import pytest

from adapters.slurm_ssh import SlurmSSHAdapter
from broker.adapter import ClusterAdapter
from tests.contract.target import ContractTarget

ROOT = pathlib.Path(__file__).resolve().parents[2]
GENERATED = ROOT / "deploy" / "slurm-dev" / "generated"
RUN_IN = ROOT / "deploy" / "slurm-dev" / "run-in"
RELEASES = ("22.05", "24.11", "26.05")


def definition_path(release: str) -> pathlib.Path:
    """Where ``make slurm-up`` writes the slurm_ssh cluster definition."""
    return GENERATED / release / "slurm_ssh.toml"


def load_connection(release: str) -> dict[str, Any] | None:
    """The ``connection`` table for ``release`` (with ``query_username`` defaulted
    to alice), or None when the cluster was never brought up."""
    path = definition_path(release)
    if not path.exists():
        return None
    with path.open("rb") as fh:
        connection = dict(tomllib.load(fh)["connection"])
    connection.setdefault("query_username", "alice")
    return connection


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_on_cluster(release: str) -> Callable[[list[str]], str] | None:
    """``deploy/slurm-dev/run-in RELEASE ...`` as a callable, if it exists."""
    if not RUN_IN.exists():
        return None

    def run(argv: list[str]) -> str:
        done = subprocess.run(
            [str(RUN_IN), release, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        return done.stdout

    return run


def make_target(release: str) -> ContractTarget:
    """A ready target, or ``pytest.skip`` with the reason and the fix."""
    hint = f"run `make slurm-up SLURM_RELEASE={release}`"
    connection = load_connection(release)
    if connection is None:
        pytest.skip(
            f"Slurm {release} dev cluster not set up ({definition_path(release)} missing): {hint}"
        )
    adapter = SlurmSSHAdapter(f"dev{release}-ssh", connection, data_dir="/tmp")
    health = adapter.health()
    if not health.ok:
        adapter.close()
        pytest.skip(f"Slurm {release} dev cluster not running ({health.detail}): {hint}")

    def unreachable() -> ClusterAdapter:
        return SlurmSSHAdapter("down", {**connection, "port": closed_port()}, data_dir="/tmp")

    return ContractTarget(
        adapter=adapter,
        unreachable=unreachable,
        settle_timeout=60.0,
        run_on_cluster=run_on_cluster(release),
        extra={"scheduler_calls": adapter.scheduler_calls, "timeout_wait": 180.0},
    )


def targets() -> list[object]:
    """One target per dev Slurm release, marked ``slurm`` (``-m "not slurm"`` drops them)."""
    return [
        pytest.param(
            lambda r=release: make_target(r), id=f"slurm_ssh-{release}", marks=[pytest.mark.slurm]
        )
        for release in RELEASES
    ]
