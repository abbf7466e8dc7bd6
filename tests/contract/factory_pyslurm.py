"""Contract target: the pyslurm adapter against the pyslurm 25.11 stand-in.

The stand-in (``tests/contract/pyslurm_standin``) is put on ``sys.modules`` as
``pyslurm`` only while the adapter imports it, then the previous entry is
restored, so nothing else in the test session sees a fake pyslurm. The stand-in
runs jobs as the current user, so the target's user is the current user.
"""

from __future__ import annotations

import getpass
import shutil
import sys
import tempfile

import pytest

from adapters.pyslurm_adapter import PySlurmAdapter
from broker.adapter import ClusterAdapter
from tests.contract import pyslurm_standin
from tests.contract.pyslurm_standin._sim import CONTROLLER, SimPartition
from tests.contract.target import ContractTarget

_QUERIES = ("jobs_load", "job_load", "db_jobs_load")


class _StandinAdapter(PySlurmAdapter):
    """Stops the stand-in's jobs and removes the output directory on close."""

    def close(self) -> None:
        CONTROLLER.shutdown()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        super().close()


def _with_standin_as_pyslurm(settings: dict[str, object], tmp: str) -> PySlurmAdapter:
    previous = sys.modules.get("pyslurm")
    sys.modules["pyslurm"] = pyslurm_standin
    try:
        return _StandinAdapter("pyslurm-standin", settings, data_dir=tmp)
    finally:
        if previous is None:
            del sys.modules["pyslurm"]
        else:
            sys.modules["pyslurm"] = previous


def make_pyslurm_target() -> ContractTarget:
    """The pyslurm adapter over a stand-in cluster with ``cpu`` and 2-GPU ``gpu``."""
    CONTROLLER.shutdown()
    CONTROLLER.configure(
        [SimPartition("cpu", cpus=4, memory_mb=4096, nodes=2, max_time=120, default=True),
         SimPartition("gpu", cpus=4, gpus=2, memory_mb=8192, nodes=1, max_time=120)],
        seconds_per_minute=1.0, start_delay=0.2, db_lag=0.3, min_job_age=3.0,
    )
    tmp = tempfile.mkdtemp(prefix="aifa-contract-pyslurm-")
    settings: dict[str, object] = {"output_pattern": f"{tmp}/aifa-%j.out"}
    adapter = _with_standin_as_pyslurm(settings, tmp)

    def unreachable() -> ClusterAdapter:
        return PySlurmAdapter("pyslurm-down", {}, data_dir=tmp,
                              api=pyslurm_standin.unreachable_api())

    def scheduler_calls() -> int:
        return sum(CONTROLLER.calls[k] for k in _QUERIES)

    return ContractTarget(adapter=adapter, unreachable=unreachable, username=getpass.getuser(),
                          settle_timeout=20.0, extra={"scheduler_calls": scheduler_calls})


def targets() -> list[object]:
    """The stand-in target (always available)."""
    return [pytest.param(make_pyslurm_target, id="pyslurm-standin")]
