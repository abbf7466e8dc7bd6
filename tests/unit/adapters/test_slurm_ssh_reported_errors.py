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
