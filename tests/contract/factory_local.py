"""Contract target: the embedded ``local`` adapter on a temporary data directory.

``time_scale`` = 1 makes a "1 minute" time limit fire after one second, so the
whole suite takes seconds here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from adapters.local import LocalAdapter
from broker.adapter import ClusterAdapter, SchedulerJobRef
from tests.contract.target import ContractTarget

SETTINGS = {
    "time_scale": 1,
    "kill_grace_seconds": 0.5,
    "partitions": [
        {"name": "cpu", "cpus": 4, "memory_mb": 4096, "default": True},
        {"name": "gpu", "cpus": 4, "gpus": 2, "memory_mb": 8192},
    ],
}


class _DisposableLocalAdapter(LocalAdapter):
    """Cancels leftover jobs and deletes its data directory on close (tests only)."""

    def close(self) -> None:
        drain_local_jobs(self, [SchedulerJobRef(job_id=j, username="alice") for j in self._job_ids()])
        shutil.rmtree(self.data_dir, ignore_errors=True)
        super().close()


def drain_local_jobs(adapter: ClusterAdapter, refs: list[SchedulerJobRef]) -> None:
    """Cancel ``refs`` and wait (bounded) until each is final."""
    for ref in refs:
        adapter.cancel(ref)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(s.final for s in adapter.poll(refs)):
        time.sleep(0.05)


def make_local_target() -> ContractTarget:
    """A local adapter with a ``cpu`` and a 2-GPU ``gpu`` partition."""
    data_dir = tempfile.mkdtemp(prefix="aifa-contract-local-")
    blocker = Path(data_dir) / "a-file"
    blocker.write_text("a regular file: nothing can be created below it")

    def unreachable() -> ClusterAdapter:
        return LocalAdapter("local", SETTINGS, data_dir=str(blocker / "data"))

    adapter = _DisposableLocalAdapter("local", SETTINGS, data_dir=data_dir)
    return ContractTarget(adapter=adapter, unreachable=unreachable, settle_timeout=20.0)


def targets() -> list[object]:
    """The local target (always available)."""
    return [pytest.param(make_local_target, id="local")]
