"""squeue/sacct --json that exit 0 but report errors (22.05 with slurmctld down)."""

from __future__ import annotations

import json

import pytest

from adapters.slurm_ssh import parse
from broker.adapter import ClusterUnreachable

DOWN = {"meta": {}, "errors": [{"description": "Failed while looking for jobs", "error_number": -1,
                                "error": "Unspecified error", "source": "slurm_load_jobs"}], "jobs": []}


def test_controller_down_is_unreachable_not_an_empty_queue() -> None:
    with pytest.raises(ClusterUnreachable, match="Failed while looking for jobs"):
        parse.parse_squeue_json(json.dumps(DOWN))


def test_invalid_job_id_error_means_no_such_jobs() -> None:
    doc = {"errors": [{"description": "Invalid job id specified"}], "jobs": []}
    assert parse.parse_squeue_json(json.dumps(doc)) == []


def test_no_errors_is_fine() -> None:
    assert parse.parse_squeue_json(json.dumps({"errors": [], "jobs": []})) == []


def test_sacct_rows_with_sluid_carry_the_global_id() -> None:
    from adapters.slurm_common.accounting import SACCT_PARSABLE_FIELDS_SLUID

    row = "|".join(["193", "193", "bob", "proj-a", "gpu", "COMPLETED", "1795690000", "1795690001", "1795690061",
                    "60", "5", "cpu=1,gres/gpu=1,node=1", "0:0", "sA81M8BWEW7500", "name|with|bars"])
    (job,), skipped = parse.parse_sacct_parsable(row, SACCT_PARSABLE_FIELDS_SLUID)
    assert skipped == 0 and job.global_id == "sA81M8BWEW7500" and job.name == "name|with|bars"
    assert job.to_usage_record().global_id == "sA81M8BWEW7500"
