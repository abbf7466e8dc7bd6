"""Batch scripts with #SBATCH lines, over HTTP against real Slurm (issue 8), per
release × adapter: a script's GPUs are estimated and charged (sacct AllocTRES);
another project's account and --uid are refused and sacct shows the broker's user and
account; an over-budget `-G 4` is refused before anything reaches Slurm; --exclusive
is reserved as the whole node Slurm allocates; dependencies name broker job ids;
`--array=0-3` is reserved as every task Slurm allocates, each task charged once."""

# ruff: noqa: F811 - test functions take the imported `slurm_env` fixture by name
from __future__ import annotations

import time
import uuid

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from broker.cost import slurm_tres
from broker.services import ledger
from tests.e2e.test_slurm_http import slurm_env  # noqa: F401 - the shared per release × adapter fixture
from tests.support import slurm
from tests.support.env import BrokerEnv

pytestmark = pytest.mark.slurm
PROJECT = "EHPC-SLURM-001"


def _post(env: BrokerEnv, path: str, cluster: str, script: str, **over: object):  # type: ignore[no-untyped-def]
    body = {"project": PROJECT, "cluster": cluster, "script": script, **over}
    return env.call("POST", path, env.auth("alice"), json=body)


def _names_seen(release: str) -> str:
    """Every job name the cluster knows of from the last 10 minutes (queue + accounting)."""
    queue = slurm.run_in(release, "squeue", "-a", "-h", "-t", "all", "-o", "%j")
    acct = slurm.run_in(release, "sacct", "-a", "-X", "-n", "-P", "-S", "now-10minutes", "-o", "JobName%200")
    return queue + acct


def test_script_gres_is_estimated_and_charged(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    script = "#!/bin/bash\n#SBATCH --gres=gpu:2\n#SBATCH -p gpu\n#SBATCH --time=5\nsleep 2\necho ok\n"
    est = _post(env, "/v1/jobs/estimate", cluster, script).json()
    assert est["allowed"] and abs(est["estimated_cost"]["amount"] - 2 * 5 / 60) < 2e-6, est
    r = _post(env, "/v1/jobs", cluster, script)
    assert r.status_code == 201, r.text
    job = r.json()
    request = job["request"]
    assert (request["gpus_per_node"], request["sources"]["gpus_per_node"]) == (2, "script:2")
    assert (request["partition"], request["time_limit_minutes"]) == ("gpu", 5)
    done = env.wait_settled(job["id"], env.auth("alice"), timeout=120)
    assert done["state"] == "COMPLETED", done
    acct = slurm.sacct_job(release, done["scheduler_job_id"])
    assert slurm.tres(acct["AllocTRES"]).get("gres/gpu") == 2
    assert (acct["User"], acct["Account"]) == ("alice", slurm.E2E_ACCOUNT)
    assert abs(done["charged"]["amount"] - 2 * int(acct["ElapsedRaw"]) / 3600) < 2e-6


def test_identity_directives_refused_and_slurm_sees_the_brokers_choice(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    marker = f"ident-{uuid.uuid4().hex[:8]}"
    for line in ("--account=proj-b", "-A proj-b", "--uid=0", "--gid=0", "--qos=normal", "--reservation=x",
                 "--wckey=w", "--nice=-100", "--hold", "--priority=1000000"):
        script = f"#!/bin/bash\n#SBATCH -J {marker} -t 2\n#SBATCH {line}\nid\n"
        r = _post(env, "/v1/jobs", cluster, script)
        assert (r.status_code, r.json()["code"]) == (422, "unsupported_directive"), (line, r.text)
        assert r.json()["line"] == 3 and line in r.json()["directive"]
    assert marker not in _names_seen(release)
    # the allocation's own account is accepted; Slurm shows the broker's user and account
    r = _post(env, "/v1/jobs", cluster, f"#!/bin/bash\n#SBATCH -A {slurm.E2E_ACCOUNT} -J {marker} -t 2\nid -un\n")
    assert r.status_code == 201, r.text
    done = env.wait_settled(r.json()["id"], env.auth("alice"), timeout=120)
    acct = slurm.sacct_job(release, done["scheduler_job_id"])
    assert (acct["User"], acct["Account"]) == ("alice", slurm.E2E_ACCOUNT)


def test_over_budget_gpus_refused_before_slurm(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    marker = f"overbudget-{uuid.uuid4().hex[:8]}"
    # 4 GPUs × 2000 min = 133 gpu_hours > the 100 granted
    script = f"#!/bin/bash\n#SBATCH -G 4\n#SBATCH -p gpu -t 2000 -J {marker}\nsleep 1\n"
    est = _post(env, "/v1/jobs/estimate", cluster, script).json()
    assert not est["allowed"] and [d["code"] for d in est["denials"]] == ["quota_exceeded"]
    r = _post(env, "/v1/jobs", cluster, script)
    assert (r.status_code, r.json()["code"]) == (409, "quota_exceeded"), r.text
    assert r.json()["estimated_cost"]["amount"] > r.json()["remaining"]["amount"]
    time.sleep(1)
    assert marker not in _names_seen(release)
    # and 8 GPUs per node cannot fit the 4-GPU partition: refused from discovered data
    est = _post(env, "/v1/jobs/estimate", cluster, "#!/bin/bash\n#SBATCH --gpus-per-node=8 -p gpu -t 1\n").json()
    assert "exceeds_partition" in [d["code"] for d in est["denials"]]


def test_exclusive_reservation_covers_the_whole_node_slurm_allocates(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    script = "#!/bin/bash\n#SBATCH --exclusive -p gpu -t 3\nsleep 2\n"
    r = _post(env, "/v1/jobs", cluster, script)
    assert r.status_code == 201, r.text
    job = r.json()
    done = env.wait_settled(job["id"], env.auth("alice"), timeout=120)
    acct = slurm.tres(slurm.sacct_job(release, done["scheduler_job_id"])["AllocTRES"])
    part = next(p for p in env.call("GET", f"/v1/clusters/{cluster}", env.qm).json()["partitions"]
                if p["name"] == "gpu")
    req = job["request"]
    priced = slurm_tres(nodes=req["nodes"], cpus=req["cpus_per_task"], gpus_per_node=req["gpus_per_node"],
                        memory_per_node_mb=req["memory_per_node_mb"], exclusive=req["exclusive"], partition=part)
    for tres in ("cpu", "node", "mem", "gres/gpu"):
        assert priced[tres] >= acct.get(tres, 0.0), (tres, priced, acct)
    assert acct["cpu"] == part["cpus_per_node"]  # Slurm did give the whole node
    # reserved: every GPU of the node for the time limit (gpu_hours)
    assert abs(job["reserved"]["amount"] - part["gpus_per_node"] * 3 / 60) < 2e-6
    assert job["reserved"]["amount"] + 1e-9 >= acct.get("gres/gpu", 0.0) * 3 / 60


def test_dependency_names_broker_jobs_of_the_same_user(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    first = _post(env, "/v1/jobs", cluster, "#!/bin/bash\n#SBATCH -t 2\nsleep 3\n")
    assert first.status_code == 201, first.text
    a = first.json()
    r = _post(env, "/v1/jobs", cluster, f"#!/bin/bash\n#SBATCH -t 2 --dependency=afterok:{a['id']}\necho after\n")
    assert r.status_code == 201, r.text
    b = r.json()
    assert b["request"]["dependency"] == f"afterok:{a['id']}"
    shown = slurm.run_in(release, "scontrol", "-o", "show", "job", b["scheduler_job_id"])
    assert f"afterok:{a['scheduler_job_id']}" in shown, shown
    done = env.wait_settled(b["id"], env.auth("alice"), timeout=120)
    first_done = env.job(a["id"], env.auth("alice"))
    assert done["state"] == "COMPLETED" and first_done["ended_at"] <= done["started_at"]
    # another user's job, an unknown id, a scheduler id: 422
    bob = env.call("POST", "/v1/jobs", env.auth("bob"), json={
        "project": PROJECT, "cluster": cluster, "script": f"#!/bin/bash\n#SBATCH -t 1 -d afterany:{a['id']}\n"})
    assert (bob.status_code, bob.json()["code"]) == (422, "invalid_dependency")
    for dep in (f"afterok:{uuid.uuid4().hex}", f"afterok:{a['scheduler_job_id']}"):
        r = _post(env, "/v1/jobs", cluster, f"#!/bin/bash\n#SBATCH -t 1 --dependency={dep}\n")
        assert r.status_code == 422 and r.json()["code"] in ("invalid_dependency", "unsupported_directive"), r.text


def test_mapped_directives_reach_slurm_as_the_effective_request(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    script = ("#!/bin/bash\n#SBATCH --job-name=mapped -N 1-2 -n 2 -c 2 --mem-per-cpu=700 -t 0:90\n"
              "#SBATCH --mail-type=END,FAIL --mail-user=alice@example.eu -o ignored-%j.out\nsleep 1\n")
    r = _post(env, "/v1/jobs", cluster, script, cpus_per_task=1)
    assert r.status_code == 201, r.text
    job = r.json()
    req = job["request"]
    # the JSON cpus_per_task overrides -c 2; the range is capped at the partition's one node
    assert (req["cpus_per_task"], req["sources"]["cpus_per_task"]) == (1, "json")
    assert (req["nodes"], req["min_nodes"], req["ntasks"], req["time_limit_minutes"]) == (1, None, 2, 2)
    assert req["memory_per_node_mb"] == 1400 and any("--output" in n or "-o" in n for n in req["notes"])
    shown = slurm.run_in(release, "scontrol", "-o", "show", "job", job["scheduler_job_id"])
    for word in ("JobName=mapped.aifa-", "NumTasks=2", "CPUs/Task=1", "TimeLimit=00:02:00",
                 "MailUser=alice@example.eu", "MailType=END,FAIL"):
        assert word in shown, (word, shown)
    assert "ignored-" not in shown  # the broker keeps the output where it can read it
    done = env.wait_settled(job["id"], env.auth("alice"), timeout=120)
    acct = slurm.tres(slurm.sacct_job(release, done["scheduler_job_id"])["AllocTRES"])
    assert (acct["cpu"], acct["node"], acct["mem"]) == (2, 1, 1400)


def test_array_reservation_covers_every_task_and_each_task_is_charged_once(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    script = "#!/bin/bash\n#SBATCH --array=0-3%2\n#SBATCH --gres=gpu:1 -p gpu -t 3\nsleep 2\necho $SLURM_ARRAY_TASK_ID\n"
    est = _post(env, "/v1/jobs/estimate", cluster, script).json()
    assert est["allowed"] and abs(est["estimated_cost"]["amount"] - 4 * 3 / 60) < 2e-6, est
    r = _post(env, "/v1/jobs", cluster, script)
    assert r.status_code == 201, r.text
    job = r.json()
    assert abs(job["reserved"]["amount"] - 4 * 3 / 60) < 2e-6 and job["array"]["tasks"] == 4
    sid = job["scheduler_job_id"]
    shown = slurm.run_in(release, "scontrol", "-o", "show", "job", sid)
    assert "ArrayTaskThrottle=2" in shown, shown  # one Slurm array, the broker's throttle
    done = env.wait_settled(job["id"], env.auth("alice"), timeout=240)
    assert done["state"] == "COMPLETED" and done["array"]["counts"] == {"COMPLETED": 4}, done
    out = slurm.run_in(release, "sacct", "-X", "-n", "-P", "-j", sid, "-o",
                       "JobID,AllocTRES,ElapsedRaw,User,Account,JobIDRaw")
    rows = {r[0]: r[:5] for r in (line.split("|") for line in out.splitlines() if line.strip())}
    raw_ids = [line.split("|")[5] for line in out.splitlines() if line.strip()]
    assert sorted(rows) == [f"{sid}_{t}" for t in range(4)], out
    tasks = {t["scheduler_job_id"]: t for t in env.call("GET", f"/v1/jobs/{job['id']}/tasks",
                                                        env.auth("alice")).json()["items"]}
    for key, (_, alloc, elapsed, user, account) in rows.items():
        gpus = slurm.tres(alloc).get("gres/gpu", 0.0)
        assert (gpus, user, account) == (1, "alice", slurm.E2E_ACCOUNT), rows[key]
        # the reservation (1 GPU × the time limit per task) covers what Slurm allocated to the task
        assert gpus * 3 / 60 <= job["reserved"]["amount"] / 4 + 1e-9
        assert abs(tasks[key]["charged"]["amount"] - gpus * int(elapsed) / 3600) < 2e-6, (key, tasks[key])
    assert abs(done["charged"]["amount"] - sum(t["charged"]["amount"] for t in tasks.values())) < 5e-6
    with env.engine.connect() as conn:
        kinds = conn.execute(sa.text("SELECT kind, task FROM ledger_entries WHERE job_id = :j"),
                             {"j": job["id"]}).all()
    assert sorted(t for k, t in kinds if k == "charge") == [0, 1, 2, 3]
    assert sorted(t for k, t in kinds if k == "release") == [0, 1, 2, 3]
    # the usage import (every 2 s here) reads the four tasks from sacct (each under its own job
    # id) and charges none of them again; other jobs of the shared dev cluster it may import
    time.sleep(5)
    env.app.state.tracker.importer.run_cycle(force=True)
    with env.engine.connect() as conn:
        seen = conn.execute(sa.text("SELECT count(*) FROM imported_jobs")).scalar_one()
        again = conn.execute(sa.select(sa.func.count()).select_from(sa.table("imported_jobs", sa.column(
            "scheduler_job_id"))).where(sa.column("scheduler_job_id").in_(raw_ids))).scalar_one()
    assert again == 0, f"array tasks {raw_ids} imported as direct jobs ({seen} imported in all)"
    with Session(env.engine) as session:
        assert ledger.check(session) == []
