"""What Slurm says about a waiting job (issue 8 point 6), against the real dev
clusters: the 4 GPUs are occupied by a short job of our own, then a GPU job
submitted through the broker — once through ``slurm_ssh`` and once through
``slurm_rest`` — shows Slurm's pending reason within one tracker cycle of Slurm
reporting it, and the expected start once the backfill scheduler has computed
one (what ``squeue --start`` prints). The REST adapter is also polled with every
data-parser version the release serves. Everything started is cancelled."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from adapters.slurm_rest import SlurmRestAdapter
from broker.adapter import SchedulerJobRef
from tests.contract.factory_slurm_rest import load_settings
from tests.support import slurm
from tests.support.env import BrokerEnv, broker_env

pytestmark = pytest.mark.slurm

POLL_SECONDS = 1.0
#: data-parser versions each release's slurmrestd serves (22.05: v0.0.38 only)
SERVED = {"22.05": ("v0.0.38",), "24.11": ("v0.0.40", "v0.0.41", "v0.0.42"),
          "26.05": ("v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45")}


def _queue(release: str, job_id: str) -> dict:
    """The job as ``squeue --json`` shows it (filtered here: 22.05 ignores filters)."""
    jobs = json.loads(slurm.run_in(release, "squeue", "--json"))["jobs"]
    for job in jobs:
        if str(job["job_id"]) == job_id:
            return dict(job)
    return {}


def _last_poll(env: BrokerEnv, cluster: str) -> datetime | None:
    """When the tracker last finished a poll of ``cluster``."""
    with env.engine.connect() as conn:
        value = conn.execute(sa.text("SELECT last_poll_at FROM clusters WHERE name = :n"), {"n": cluster}).scalar()
    if value is None:
        return None
    value = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return value.replace(tzinfo=UTC)


def _number(value: object) -> int:
    if isinstance(value, dict):
        return int(value.get("number", 0)) if value.get("set", True) else 0
    return int(value or 0)


def _state(job: dict) -> str:
    state = job.get("job_state")
    return state[0] if isinstance(state, list) else str(state)


@pytest.fixture(params=[r for r in slurm.RELEASES], ids=lambda r: f"both-adapters-{r}")
def two_clusters(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[BrokerEnv, str]]:
    release = request.param
    slurm.require_cluster(release)
    with broker_env(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite3'}", usage_import_interval_seconds=3600) as env:
        for adapter in slurm.ADAPTERS:
            definition = slurm.definition(release, adapter)
            definition["poll_interval_seconds"] = POLL_SECONDS
            r = env.call("POST", "/v1/clusters", env.qm, json=definition)
            assert r.status_code == 201, r.text
            # one project on both definitions: two projects cannot share the Slurm account
            # proj-a of one cluster (their direct jobs could not be told apart)
            if adapter == slurm.ADAPTERS[0]:
                env.setup_project("EHPC-WAIT", amount=100, unit="gpu_hours", members=("alice",),
                                  cluster=definition["name"], account="proj-a")
            else:
                r = env.call("POST", "/v1/projects/EHPC-WAIT/allocations", env.qm, json={
                    "cluster": definition["name"], "unit": "gpu_hours", "amount": 100, "account": "proj-a"})
                assert r.status_code == 201, r.text
                r = env.call("PUT", f"/v1/clusters/{definition['name']}/accounts/alice", env.qm,
                             json={"username": "alice"})
                assert r.status_code == 200, r.text
        yield env, release


def test_a_job_waiting_for_gpus_shows_slurms_reason_and_expected_start(two_clusters) -> None:  # type: ignore[no-untyped-def]
    env, release = two_clusters
    alice = env.auth("alice")
    clusters = {a: slurm.definition(release, a)["name"] for a in slurm.ADAPTERS}
    occupier = slurm.run_in(release, "sbatch", "--parsable", "--uid=alice", "--account=proj-a", "--partition=gpu",
                            "--gres=gpu:4", "--time=1", "--job-name=occupy-gpus", "-o", "/dev/null",
                            "--wrap=sleep 55").strip().split(";")[0]
    jobs: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 60
        while _state(_queue(release, occupier)) != "RUNNING":
            assert time.monotonic() < deadline, "the GPU-occupying job never started"
            time.sleep(0.5)
        for adapter, cluster in clusters.items():
            r = env.call("POST", "/v1/jobs", alice, json={
                "project": "EHPC-WAIT", "cluster": cluster,
                "partition": "gpu", "gpus_per_node": 1, "time_limit_minutes": 2,
                "script": "#!/bin/bash\nsleep 1\n"})
            assert r.status_code == 201, r.text
            jobs[adapter] = r.json()
        lags: dict[str, float] = {}
        for adapter, job in jobs.items():
            # once Slurm gives a reason, the record shows it after the next tracker poll:
            # at the latest when a second poll has completed since (the first may have
            # started before Slurm had a reason; polls of a cluster run one after another)
            seen: set[str] = set()
            seen_at: datetime | None = None
            polls_since: set[datetime] = set()
            deadline = time.monotonic() + 60
            while True:
                reason = slurm.run_in(release, "squeue", "-h", "-j", job["scheduler_job_id"], "-o", "%T %r").split()
                assert reason and reason[0] == "PENDING", reason
                if reason[1:] and reason[1] != "None":
                    seen.add(reason[1])
                    seen_at = seen_at or datetime.now(UTC)
                shown = env.job(job["id"], alice)
                if seen and shown["pending_reason"] in seen:
                    lags[adapter] = (datetime.now(UTC) - seen_at).total_seconds() if seen_at else 0.0
                    break
                if seen_at is not None:
                    last = _last_poll(env, clusters[adapter])
                    if last is not None and last > seen_at:
                        polls_since.add(last)
                    assert len(polls_since) < 2, (adapter, seen, shown, sorted(polls_since))
                assert time.monotonic() < deadline, f"Slurm gave no reason for job {job['scheduler_job_id']}"
                time.sleep(0.05)
            assert seen <= {"Resources", "Priority"}, seen
            shown = env.job(job["id"], alice)
            assert shown["state"] == "PENDING" and shown["started_at"] is None
        # the backfill scheduler's projection (every ~30 s) reaches the job record
        for adapter, job in jobs.items():
            deadline = time.monotonic() + 45
            while not _number(_queue(release, job["scheduler_job_id"]).get("start_time")):
                assert time.monotonic() < deadline, "Slurm computed no expected start"
                time.sleep(1)
            projected = datetime.fromtimestamp(_number(_queue(release, job["scheduler_job_id"])["start_time"]), UTC)
            shown = env.wait_job(job["id"], alice, lambda j: j["expected_start"] is not None,
                                 timeout=POLL_SECONDS + 3)
            got = datetime.fromisoformat(shown["expected_start"])
            assert abs((got - projected).total_seconds()) <= 60, (got, projected)  # backfill may move it
            assert shown["started_at"] is None
        # every data-parser version of the REST API reads the same reason and projection
        for version in SERVED[release]:
            rest = SlurmRestAdapter(f"v-{version}", {**load_settings(release), "api_version": version},
                                    data_dir="/tmp")
            try:
                job = jobs["slurm_rest"]
                (status,) = rest.poll([SchedulerJobRef(job_id=job["scheduler_job_id"], username="alice")])
                assert status.state.value == "PENDING" and status.reason in {"Resources", "Priority"}, version
                assert status.expected_start is not None and status.start_time is None, version
            finally:
                rest.close()
        print(f"\n{release}: reason shown {', '.join(f'{a} {s:.2f}s' for a, s in lags.items())} after squeue did")
        slurm.run_in(release, "scancel", occupier)
        # once it runs, the reason and the projection are gone and started_at is the real start
        for job in jobs.values():
            running = env.wait_job(job["id"], alice, lambda j: j["state"] in {"RUNNING", "COMPLETING", "COMPLETED"},
                                   timeout=60)
            assert running["pending_reason"] is None and running["expected_start"] is None
    finally:
        slurm.run_in(release, "scancel", occupier, check=False)
        for job in jobs.values():
            slurm.run_in(release, "scancel", job["scheduler_job_id"], check=False)
