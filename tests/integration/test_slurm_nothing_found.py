"""An accounting query that matches nothing is an empty result on every Slurm release
and slurmrestd version (22.05 reports it as error 9003 "Nothing found" in a 200
answer, 24.11/26.05 as a warning), never an error. Each test makes a live query that
cannot match anything (an account that does not exist), as a fresh accounting
database would answer any query."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from adapters.slurm_rest import SlurmRestAdapter
from adapters.slurm_ssh import SlurmSSHAdapter
from broker.adapter import SchedulerJobRef
from tests.contract.factory_slurm_rest import load_settings
from tests.contract.factory_slurm_ssh import load_connection
from tests.support import slurm

REST_VERSIONS = {"22.05": ("v0.0.38",), "24.11": ("v0.0.40", "v0.0.41", "v0.0.42"),
                 "26.05": ("v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45")}
CASES = [(r, v) for r, versions in REST_VERSIONS.items() for v in versions]


def _nobody() -> str:
    return f"aifa-none-{uuid.uuid4().hex[:8]}"


@pytest.mark.slurm
@pytest.mark.parametrize(("release", "version"), CASES, ids=[f"rest-{r}-{v}" for r, v in CASES])
def test_rest_accounting_query_matching_nothing_is_empty(release: str, version: str) -> None:
    slurm.require_cluster(release)
    adapter = SlurmRestAdapter(f"nf-{release}", {**load_settings(release), "api_version": version}, data_dir="/tmp")
    try:
        assert adapter.api("slurm").version == version
        assert adapter.usage(datetime.now(UTC) - timedelta(minutes=1), accounts=[_nobody()]) == []
        # a job id accounting has not recorded (yet): unknown, not an error
        ghost = SchedulerJobRef(job_id="999999999", username="bob", submit_time=datetime.now(UTC))
        assert [s for s in adapter.poll([ghost]) if s.final] == []
    finally:
        adapter.close()


@pytest.mark.slurm
@pytest.mark.parametrize("release", slurm.RELEASES, ids=[f"ssh-{r}" for r in slurm.RELEASES])
def test_ssh_accounting_query_matching_nothing_is_empty(release: str) -> None:
    slurm.require_cluster(release)
    connection = load_connection(release)
    assert connection is not None
    adapter = SlurmSSHAdapter(f"nf-{release}", connection, data_dir="/tmp")
    try:
        assert adapter.usage(datetime.now(UTC) - timedelta(minutes=1), accounts=[_nobody()]) == []
    finally:
        adapter.close()
