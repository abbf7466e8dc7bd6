"""Placement across two real Slurm clusters (issue 12 point 1): 22.05 and 24.11
registered in one broker through slurm_ssh, one project with GPU hours on both.

- the GPUs of 22.05 occupied (our own short jobs, running) → an ``auto`` GPU job
  lands on 24.11, and its placement shows 22.05's later start from
  ``sbatch --test-only``;
- 24.11 marked down (offline) → lands on 22.05 without 24.11 being asked;
- the budget on 24.11 exhausted → lands on 22.05 (24.11: quota_exceeded);
- impossible on both → one 403 refusal listing each candidate's reason.

Needs both clusters; its id carries only ``24.11`` so that scripts/test.sh's
per-release ``-k`` selection runs it once (with the 24.11 tests)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import BrokerEnv, broker_env
from tests.support.slurm import definition, require_cluster, run_in

pytestmark = pytest.mark.slurm

P = "EHPC-PLACE-SLURM"
OLD, NEW = "22.05", "24.11"
JOB = {"project": P, "cluster": "auto", "script": "#!/bin/bash\n#SBATCH --partition=accel\nsleep 1\n",
       "time_limit_minutes": 5, "gpus_per_node": 1}


def _register(env: BrokerEnv, release: str) -> str:
    data = definition(release, "slurm_ssh")
    data["partition_classes"] = {"accel": "gpu"}  # the site's "accel" class is partition gpu on both
    data.pop("poll_interval_seconds", None)
    r = env.call("POST", "/v1/clusters", env.qm, json=data)
    assert r.status_code == 201, r.text
    name = str(data["name"])
    r = env.call("PUT", f"/v1/clusters/{name}/accounts/alice", env.qm, json={"username": "alice"})
    assert r.status_code == 200, r.text
    return name


def _allocate(env: BrokerEnv, cluster: str, amount: float) -> int:
    r = env.call("POST", f"/v1/projects/{P}/allocations", env.qm, json={
        "cluster": cluster, "unit": "gpu_hours", "amount": amount, "account": "proj-a"})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _occupy_gpus(release: str) -> list[str]:
    """Hold every GPU of the release's node with our own job (cancelled by the caller)."""
    gpus = int(run_in(release, "scontrol", "-o", "show", "partition", "gpu").split("TRES=")[1]
               .split("gres/gpu=")[1].split(",")[0].split()[0])
    out = run_in(release, "runuser", "-u", "alice", "--", "sbatch", "--parsable", "-A", "proj-a", "-p", "gpu",
                 f"--gres=gpu:{gpus}", "-t", "30", "-J", "placement-occupy", "-o", "/dev/null",
                 "--wrap", "sleep 600")
    job_id = out.strip().split(";")[0]
    deadline = time.monotonic() + 60
    while run_in(release, "squeue", "-h", "-j", job_id, "-o", "%T").strip() != "RUNNING":
        assert time.monotonic() < deadline, f"occupying job {job_id} never ran on {release}"
        time.sleep(0.5)
    return [job_id]


def _cands(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["cluster"]: c for c in body["placement"]["candidates"]}


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize("releases", [pytest.param((OLD, NEW), id=f"two-clusters-{NEW}")])
def test_auto_placement_across_two_slurm_clusters(releases: tuple[str, str], tmp_path: Path) -> None:
    for release in releases:
        require_cluster(release)
    db = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    with broker_env(tmp_path, db, slurm_poll_seconds=2) as env:
        old, new = _register(env, OLD), _register(env, NEW)
        env.setup_project(P, amount=2, unit="gpu_hours", cluster=old)
        new_alloc = _allocate(env, new, 2)
        alice = env.auth("alice")
        submitted: list[tuple[str, str]] = []
        occupying: list[str] = []
        try:
            # 1. GPUs busy on 22.05 → 24.11, and the placement says why
            occupying = _occupy_gpus(OLD)
            r = env.call("POST", "/v1/jobs", alice, json=JOB)
            assert r.status_code == 201, r.text
            job = r.json()
            submitted.append((job["id"], job["cluster"]))
            assert job["cluster"] == new and job["partition"] == "gpu", job["placement"]
            cands = _cands(job)
            assert cands[old]["eligible"] and cands[new]["eligible"]
            assert cands[old]["start_method"] == cands[new]["start_method"] == "test-only"
            assert _at(cands[old]["expected_start"]) - _at(cands[new]["expected_start"]) > timedelta(minutes=5)
            assert f"{old}: eligible, start" in job["placement"]["reason"]
            assert env.job(job["id"], alice)["placement"]["chosen"] == new
        finally:
            for job_id in occupying:
                run_in(OLD, "scancel", job_id, check=False)
        try:
            # 2. 24.11 marked down → 22.05, 24.11 never asked
            assert env.call("PATCH", f"/v1/clusters/{new}", env.qm, json={"state": "offline"}).status_code == 200
            r = env.call("POST", "/v1/jobs", alice, json=JOB)
            assert r.status_code == 201, r.text
            submitted.append((r.json()["id"], r.json()["cluster"]))
            assert r.json()["cluster"] == old
            down = _cands(r.json())[new]
            assert [d["code"] for d in down["denials"]] == ["cluster_offline"] and down["start_method"] is None
            assert env.call("PATCH", f"/v1/clusters/{new}", env.qm, json={"state": "online"}).status_code == 200

            # 3. budget exhausted on 24.11 → 22.05 (left: 0.01 GPU hours; the job costs 1/12)
            alloc = next(a for a in env.call("GET", f"/v1/projects/{P}", env.qm).json()["allocations"]
                         if a["id"] == new_alloc)
            r = env.call("PATCH", f"/v1/projects/{P}/allocations/{new_alloc}", env.qm,
                         json={"amount": round(alloc["charged"] + alloc["reserved"] + 0.01, 4),
                               "reason": "test: exhaust"})
            assert r.status_code == 200, r.text
            r = env.call("POST", "/v1/jobs", alice, json=JOB)
            assert r.status_code == 201, r.text
            submitted.append((r.json()["id"], r.json()["cluster"]))
            assert r.json()["cluster"] == old
            assert [d["code"] for d in _cands(r.json())[new]["denials"]] == ["quota_exceeded"]

            # 4. impossible on both: one refusal, each candidate's reason
            r = env.call("POST", "/v1/jobs", alice, json={**JOB, "time_limit_minutes": 4 * 60})
            assert r.status_code == 403, r.text
            problem = r.json()
            assert problem["code"] == "no_eligible_cluster"
            reasons = {c["cluster"]: [d["code"] for d in c["denials"]] for c in problem["candidates"]}
            assert reasons == {old: ["quota_exceeded"], new: ["quota_exceeded"]}
        finally:
            for job_id, _ in submitted:
                env.call("POST", f"/v1/jobs/{job_id}/cancel", alice)
            for job_id, _ in submitted:
                env.wait_job(job_id, alice, lambda j: j["state"] in {"CANCELLED", "COMPLETED", "FAILED"},
                             timeout=90)
