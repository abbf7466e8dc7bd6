"""Expected start for placement, per adapter × Slurm release, against the dev
clusters (issue 12 point 1): slurm_ssh asks ``sbatch --test-only`` (nothing is
queued), slurm_rest gives a queue-depth estimate (slurmrestd has no test-only)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters.slurm_common.tags import job_name_with_tag
from broker import plugins
from broker.adapter import JobSpec, SubmitRejected
from tests.support.slurm import definition, params, require_cluster, run_in


def _adapter(release: str, kind: str, tmp_path: Path) -> Any:
    data = definition(release, kind)
    return plugins.load_adapter_class(kind)(str(data["name"]), data["connection"], data_dir=str(tmp_path))


def _spec(**kw: Any) -> JobSpec:
    values: dict[str, Any] = dict(tag=uuid.uuid4().hex, username="alice", account="proj-a",
                                  script="#!/bin/bash\nhostname\n", time_limit_minutes=5, partition="gpu",
                                  gpus_per_node=1)
    values.update(kw)
    return JobSpec(**values)


@pytest.mark.parametrize("target", params())
def test_expected_start_per_adapter(target: tuple[str, str], tmp_path: Path) -> None:
    release, kind = target
    require_cluster(release)
    adapter = _adapter(release, kind, tmp_path)
    spec = _spec()
    before = datetime.now(tz=UTC) - timedelta(minutes=1)
    try:
        answer = adapter.expected_start(spec)
        if kind == "slurm_ssh":
            assert answer.method == "test-only", answer
            assert answer.start is not None and answer.start >= before, answer  # Slurm always says when
            assert "to start at" in answer.detail and "partition gpu" in answer.detail
            with pytest.raises(SubmitRejected):  # more GPUs than any node has: refused, not queued
                adapter.expected_start(_spec(gpus_per_node=64))
        else:
            assert answer.method == "queue-depth", answer
            assert "partition gpu" in answer.detail
            if answer.detail.startswith("nothing waits"):
                assert answer.start is not None and answer.start >= before
    finally:
        adapter.close()
    # nothing was queued under the probe's name
    names = run_in(release, "squeue", "-h", "-o", "%j")
    assert job_name_with_tag(spec.name, spec.tag) not in names
