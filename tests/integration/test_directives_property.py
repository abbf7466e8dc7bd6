"""The budget invariant as a property, on every adapter that meets a live Slurm (issue 8):
for random #SBATCH/JSON combinations, what the broker prices (and so reserves) for
the time limit is ≥ what Slurm really allocates (sacct AllocTRES) for it.

Each example goes the broker's own way — effective request (JSON over directives),
partition defaults from the adapter's discovery, exceeds_partition, the JobSpec the
service submits — and the adapter submits it to the dev cluster; the job runs `true`
and its accounted TRES (as the adapter reports them, i.e. what would be charged) are
compared TRES by TRES and in cost. Also: slurmrestd/slurmctld do not read #SBATCH
lines of a script (only sbatch does), checked by submitting one un-neutralised.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapters.slurm_rest import SlurmRestAdapter
from adapters.slurm_ssh import SlurmSSHAdapter
from broker.adapter import ClusterAdapter, JobStatus
from broker.cost import allocation_tres, cost_micro, partition_misfit
from broker.directives import UnsupportedDirective, effective_request, with_partition_defaults
from broker.services.jobs import job_spec
from tests.contract.factory_slurm_rest import load_settings
from tests.contract.factory_slurm_ssh import load_connection
from tests.support.slurm import RELEASES, require_cluster, run_in

pytestmark = pytest.mark.slurm
#: a cost model weighing every TRES, so the cost comparison sees each of them
MODEL = {"partitions": {"*": {"billing_hours": {"cpu": 1.0, "mem": 0.001, "gres/gpu": 10.0, "node": 1.0}}}}


def _adapter(release: str, kind: str) -> ClusterAdapter:
    if kind == "slurm_ssh":
        conn = load_connection(release)
        assert conn is not None
        return SlurmSSHAdapter(f"prop{release}", conn, data_dir="/tmp")
    return SlurmRestAdapter(f"prop{release}", load_settings(release), data_dir="/tmp")


@pytest.fixture(scope="module", params=[(r, a) for r in RELEASES for a in ("slurm_ssh", "slurm_rest")],
                ids=lambda p: f"{p[1]}-{p[0]}")
def live(request: pytest.FixtureRequest) -> Iterator[tuple[str, ClusterAdapter, dict[str, dict[str, Any]]]]:
    release, kind = request.param
    require_cluster(release)
    adapter = _adapter(release, kind)
    parts = {p.name: {"name": p.name, "nodes": p.nodes, "cpus_per_node": p.cpus_per_node,
                      "gpus_per_node": p.gpus_per_node, "memory_per_node_mb": p.memory_per_node_mb}
             for p in adapter.discover()}
    try:
        yield release, adapter, parts
    finally:
        adapter.close()


DIRECTIVES = st.lists(st.sampled_from([
    "-c 2", "--cpus-per-task=3", "-n 2", "--ntasks=3", "--ntasks-per-node=2", "-N 1", "--nodes=1-2",
    "--gres=gpu:1", "--gres=gpu:2", "-G 1", "--gpus-per-node=2", "--gpus-per-task=1", "--mem=1G",
    "--mem=5000", "--mem-per-cpu=1500", "--mem=0", "--exclusive", "-p gpu", "-p cpu", "--time=1:30",
    "-t 2", "-J prop", "--array=0-1", "--array=0-4:2%2",
]), max_size=4)
JSON = st.fixed_dictionaries({}, optional={
    "cpus_per_task": st.integers(1, 4), "gpus_per_node": st.integers(0, 2),
    "memory_per_node_mb": st.sampled_from([500, 3000, 9000]), "ntasks_per_node": st.integers(1, 2),
    "partition": st.sampled_from(["cpu", "gpu"]),
})


def _wait_final(adapter: ClusterAdapter, ref: Any) -> list[JobStatus]:
    """The final status of the job — of each task of an array."""
    want = len(ref.array_tasks) if ref.array_tasks is not None else 1
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        got = adapter.poll([ref])
        if len(got) == want and all(s.final for s in got):
            return got
        time.sleep(1)
    adapter.cancel(replace(ref, array_tasks=None))
    raise AssertionError(f"job {ref.job_id} not final in 150 s")


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(directives=DIRECTIVES, json=JSON)
def test_reservation_covers_what_slurm_allocates(live, directives: list[str], json: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    _release, adapter, parts = live
    script = "#!/bin/sh\n" + "".join(f"#SBATCH {d}\n" for d in directives) + "true\n"
    values = {"time_limit_minutes": 2, "name": "job", "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1,
              "gpus_per_node": 0, "environment": {}, **json}
    try:
        req = effective_request(script=script, json_values=values, json_set={"time_limit_minutes", *json})
        partition = req.partition or "cpu"
        req = with_partition_defaults(req, parts[partition])
    except (UnsupportedDirective, ValueError):
        event("refused")
        return  # refused by the broker: nothing reserved, nothing submitted
    if partition_misfit(nodes=req.nodes, cpus_per_node=req.ntasks_per_node * req.cpus_per_task,
                        gpus_per_node=req.gpus_per_node, memory_per_node_mb=req.memory_per_node_mb,
                        partition=parts[partition]):
        event("exceeds_partition")
        return  # denied exceeds_partition
    priced = allocation_tres(nodes=req.nodes, cpus=req.cpus, gpus_per_node=req.gpus_per_node,
                             memory_per_node_mb=req.memory_per_node_mb, exclusive=req.exclusive,
                             partition=parts[partition])
    spec = job_spec(req, tag=uuid.uuid4().hex, username="alice", account="proj-a", partition=partition)
    event("submitted array" if req.array else "submitted")
    ref = adapter.submit(spec)
    if req.array is not None:  # one scheduler job, answered per task
        ref = replace(ref, array_tasks=req.array.task_ids)
    finals = _wait_final(adapter, ref)
    limit = req.time_limit_minutes * 60
    used = 0
    for final in finals:  # every array task: what Slurm allocated to it, priced per task
        alloc = final.alloc_tres
        assert alloc, final
        for tres in ("cpu", "mem", "node", "gres/gpu"):
            assert priced.get(tres, 0.0) >= float(alloc.get(tres, 0.0)), (script, json, tres, priced, dict(alloc))
        used += cost_micro(MODEL, partition=partition, unit="billing_hours", tres=alloc, seconds=limit)
    assert len(finals) == req.tasks
    reserved = cost_micro(MODEL, partition=partition, unit="billing_hours", tres=priced, seconds=limit) * req.tasks
    assert reserved >= used


def test_slurmrestd_does_not_read_sbatch_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why neutralising is belt and braces on slurm_rest: a script that still has
    `#SBATCH --gres=gpu:2 --exclusive` submitted through slurmrestd gets neither."""
    import adapters.slurm_rest.adapter as rest_module

    for release in RELEASES:
        require_cluster(release)
        adapter = _adapter(release, "slurm_rest")
        monkeypatch.setattr(rest_module, "refuse_directives", lambda script: None)
        try:
            spec = job_spec(effective_request(script="#!/bin/sh\nsleep 30\n", json_values={"time_limit_minutes": 2},
                                              json_set={"time_limit_minutes"}),
                            tag=uuid.uuid4().hex, username="alice", account="proj-a", partition="gpu")
            spec = type(spec)(**{**spec.__dict__, "script": "#!/bin/sh\n#SBATCH --gres=gpu:2 --exclusive -c 4\n"
                                 "sleep 30\n"})
            ref = adapter.submit(spec)
            try:
                deadline = time.monotonic() + 30
                shown = run_in(release, "scontrol", "-o", "show", "job", ref.job_id)
                while "JobState=RUNNING" not in shown and time.monotonic() < deadline:
                    time.sleep(1)
                    shown = run_in(release, "scontrol", "-o", "show", "job", ref.job_id)
                assert "JobState=RUNNING" in shown, shown
                tres = re.search(r"\b(?:Alloc)?TRES=(\S+)", shown)
                # no GPU, one CPU: neither --gres, --exclusive nor -c 4 was read
                assert tres and "gres/gpu" not in tres.group(1) and "cpu=1," in tres.group(1), shown
                assert "NumCPUs=1 " in shown, shown
            finally:
                adapter.cancel(ref)
        finally:
            adapter.close()
