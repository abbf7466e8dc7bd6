"""Every data-parser version each release serves, forced one at a time with
``api_version``: a GPU job reaches the scheduler with its GPUs and is accounted.
(Without ``api_version`` discovery picks the newest; the contract suite covers that.)"""

from __future__ import annotations

import time
import uuid

import pytest

from adapters.slurm_rest import SlurmRestAdapter
from broker.adapter import JobSpec
from tests.contract.factory_slurm_rest import load_settings
from tests.support import slurm

SERVED = {"24.11": ("v0.0.40", "v0.0.41", "v0.0.42"),
          "26.05": ("v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45")}


@pytest.mark.slurm
@pytest.mark.parametrize(("release", "version"),
                         [(r, v) for r, versions in SERVED.items() for v in versions],
                         ids=[f"{r}-{v}" for r, versions in SERVED.items() for v in versions])
def test_forced_version_runs_a_gpu_job(release: str, version: str) -> None:
    slurm.require_cluster(release)
    adapter = SlurmRestAdapter(f"v-{release}", {**load_settings(release), "api_version": version}, data_dir="/tmp")
    try:
        assert adapter.api("alice").version == version
        ref = adapter.submit(JobSpec(tag=uuid.uuid4().hex,
                                     username="alice", account="proj-a", script="#!/bin/bash\nsleep 1\n",
                                     time_limit_minutes=2, partition="gpu", gpus_per_node=1,
                                     memory_per_node_mb=200))
        deadline = time.monotonic() + 90
        while True:
            (status,) = adapter.poll([ref]) or (None,)
            if status is not None and status.final:
                break
            assert time.monotonic() < deadline, f"job {ref.job_id} never final: {status}"
            time.sleep(1)
        assert status.state.value == "COMPLETED"
        assert status.alloc_tres.get("gres/gpu") == 1
        assert slurm.tres(slurm.sacct_job(release, ref.job_id)["AllocTRES"]).get("gres/gpu") == 1
    finally:
        adapter.close()
