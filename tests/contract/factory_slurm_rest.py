"""Contract targets: the ``slurm_rest`` adapter against each dev Slurm cluster.

One target per release whose ``deploy/slurm-dev/generated/<release>/slurm_rest.toml``
exists (written by ``make slurm-up SLURM_RELEASE=<release>``); a target whose
slurmrestd does not answer is skipped with the reason. When the definition has
no ``query_username``, the dev clusters' ``SlurmUser`` (``slurm``) reads the
queue and accounting for every user.
"""

from __future__ import annotations

import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.slurm_rest import SlurmRestAdapter
from broker.adapter import ClusterAdapter
from tests.contract.target import ContractTarget

ROOT = Path(__file__).resolve().parents[2]
RELEASES = ("22.05", "24.11", "26.05")
DEV_QUERY_USER = "slurm"
#: a port nothing listens on: connection refused
UNREACHABLE_URL = "http://127.0.0.1:9"


def definition_path(release: str) -> Path:
    """Where ``make slurm-up`` writes the release's slurm_rest cluster definition."""
    return ROOT / "deploy" / "slurm-dev" / "generated" / release / "slurm_rest.toml"


def load_settings(release: str) -> dict[str, Any]:
    """The ``connection`` table of the generated definition (+ the dev query user)."""
    with definition_path(release).open("rb") as fh:
        definition = tomllib.load(fh)
    settings = dict(definition["connection"])
    settings.setdefault("query_username", DEV_QUERY_USER)
    return settings


def _runner(release: str) -> Callable[[list[str]], str] | None:
    run_in = ROOT / "deploy" / "slurm-dev" / "run-in"
    if not run_in.exists():
        return None

    def run(argv: list[str]) -> str:
        done = subprocess.run([str(run_in), release, *argv], capture_output=True, text=True, timeout=60, check=False)
        return done.stdout + done.stderr

    return run


def make_target(release: str) -> ContractTarget:
    """An adapter for the release's dev cluster, or a skip when it is missing/down."""
    if not definition_path(release).exists():
        pytest.skip(f"no {definition_path(release)}: run make slurm-up SLURM_RELEASE={release}")
    settings = load_settings(release)
    adapter = SlurmRestAdapter(f"dev{release}-rest", settings, data_dir="/tmp")
    health = adapter.health()
    if not health.ok:
        adapter.close()
        pytest.skip(f"slurm_rest {release} dev cluster not healthy: {health.detail}")

    def unreachable() -> ClusterAdapter:
        return SlurmRestAdapter(f"dev{release}-rest-down", {**settings, "url": UNREACHABLE_URL}, data_dir="/tmp")

    return ContractTarget(
        adapter=adapter,
        unreachable=unreachable,
        settle_timeout=60.0,
        run_on_cluster=_runner(release),
        extra={"scheduler_calls": lambda: adapter.request_count, "timeout_wait": 200.0},
    )


def targets() -> list[object]:
    """One param per release with a generated definition (skipped ones included)."""
    params: list[object] = []
    for release in RELEASES:
        marks = [pytest.mark.slurm]
        if not definition_path(release).exists():
            reason = f"no generated slurm_rest.toml for {release} (make slurm-up)"
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(lambda r=release: make_target(r), id=f"slurm_rest-{release}", marks=marks))
    return params
