"""Batch scripts through the API on the embedded `local` cluster (issue 8), on SQLite
and PostgreSQL: the same checks the live Slurm tests make per adapter
(tests/e2e/test_directives_http.py), where the local adapter can make them."""

from __future__ import annotations

import sqlalchemy as sa

from tests.support.env import BrokerEnv

PROJECT = "EHPC-TEST-001"


def _post(env: BrokerEnv, path: str, script: str, who: str = "alice", **over: object):  # type: ignore[no-untyped-def]
    return env.call("POST", path, env.auth(who), json={"project": PROJECT, "script": script, **over})


def _jobs(env: BrokerEnv) -> int:
    with env.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one())


def test_script_gpus_are_estimated_reserved_and_charged(env: BrokerEnv) -> None:
    env.setup_project(unit="gpu_hours", amount=10)
    script = "#!/bin/sh\n#SBATCH --gres=gpu:2 -p gpu\n#SBATCH --time=30\nsleep 1\n"
    est = _post(env, "/v1/jobs/estimate", script).json()
    assert est["allowed"] and est["estimated_cost"] == {"unit": "gpu_hours", "amount": 1.0}
    r = _post(env, "/v1/jobs", script)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["reserved"]["amount"] == 1.0 and job["request"]["sources"]["gpus_per_node"] == "script:2"
    assert job["partition"] == "gpu" and job["request"]["script"] == script  # the record keeps it as sent
    done = env.wait_settled(job["id"], env.auth("alice"))
    assert done["state"] == "COMPLETED"
    assert abs(done["charged"]["amount"] - 2 * done["elapsed_seconds"] / 3600) < 2e-6


def test_identity_and_unpriceable_directives_are_refused_naming_the_line(env: BrokerEnv) -> None:
    env.setup_project()
    for line in ("--account=proj-b", "--uid=0", "--qos=high", "--licenses=x:1", "--arr=0-3%0", "--ex"):
        r = _post(env, "/v1/jobs", f"#!/bin/sh\n#SBATCH -t 5\n#SBATCH {line}\ntrue\n")
        body = r.json()
        assert (r.status_code, body["code"]) == (422, "unsupported_directive"), (line, body)
        assert body["line"] == 3 and line.split("=")[0] in body["directive"], body
    assert _jobs(env) == 0
    ok = _post(env, "/v1/jobs", "#!/bin/sh\n#SBATCH -A proj-a -t 5\ntrue\n")
    assert ok.status_code == 201, ok.text
    assert ok.json()["request"]["sources"]["account"].startswith("script:2")


def test_over_budget_script_is_refused_before_the_cluster(env: BrokerEnv) -> None:
    env.setup_project(unit="gpu_hours", amount=1)
    r = _post(env, "/v1/jobs", "#!/bin/sh\n#SBATCH -G 4 -p gpu -t 60\ntrue\n")
    assert (r.status_code, r.json()["code"]) == (409, "quota_exceeded"), r.text
    assert r.json()["estimated_cost"] == {"unit": "gpu_hours", "amount": 4.0}
    assert _jobs(env) == 0
    est = _post(env, "/v1/jobs/estimate", "#!/bin/sh\n#SBATCH --gpus-per-node=8 -p gpu -t 1\ntrue\n").json()
    assert [d["code"] for d in est["denials"]][:1] == ["exceeds_partition"]
    r = _post(env, "/v1/jobs", "#!/bin/sh\n#SBATCH --gpus-per-node=8 -p gpu -t 1\ntrue\n")
    assert (r.status_code, r.json()["code"]) == (403, "exceeds_partition")


def test_exclusive_and_memory_priced_as_what_they_hold(env: BrokerEnv) -> None:
    env.setup_project(unit="core_hours", amount=100)
    # the local test partitions have 16 CPUs and 64 GB per node: 4 GB per CPU
    excl = _post(env, "/v1/jobs/estimate", "#!/bin/sh\n#SBATCH --exclusive -t 60\ntrue\n").json()
    assert excl["estimated_cost"]["amount"] == 16.0
    mem = _post(env, "/v1/jobs/estimate", "#!/bin/sh\n#SBATCH --mem=20G -t 60\ntrue\n").json()
    assert mem["estimated_cost"]["amount"] == 5.0  # 20 GB / 4 GB per CPU on one CPU
    arr = _post(env, "/v1/jobs/estimate", "#!/bin/sh\n#SBATCH --array=0-3%2 -c 2 -t 60\ntrue\n").json()
    assert arr["estimated_cost"]["amount"] == 8.0  # 4 tasks × 2 CPUs × 1 h
    assert arr["allowed"] and arr["denials"] == []
    # an abbreviated --array (sbatch resolves --arr) is priced as the array it is, not as one job
    prefix = _post(env, "/v1/jobs/estimate", "#!/bin/sh\n#SBATCH --arr=0-3 -c 2 -t 60\ntrue\n").json()
    assert prefix["estimated_cost"]["amount"] == 8.0
    r = _post(env, "/v1/jobs", "#!/bin/sh\n#SBATCH --exclusive -t 1\nsleep 1\n")
    assert r.status_code == 201, r.text
    done = env.wait_settled(r.json()["id"], env.auth("alice"))
    assert done["reserved"]["amount"] == 0 and r.json()["reserved"]["amount"] == round(16 / 60, 6)
    assert abs(done["charged"]["amount"] - 16 * done["elapsed_seconds"] / 3600) < 2e-6


def test_dependency_on_own_job_translated_foreign_or_unknown_refused(env: BrokerEnv) -> None:
    env.setup_project(members=("alice", "bob"))
    first = _post(env, "/v1/jobs", "#!/bin/sh\n#SBATCH -t 1\nsleep 1\n").json()
    for who, dep in (("bob", first["id"]), ("alice", "f" * 32)):
        r = _post(env, "/v1/jobs", f"#!/bin/sh\n#SBATCH -t 1 --dependency=afterok:{dep}\ntrue\n", who=who)
        assert (r.status_code, r.json()["code"]) == (422, "invalid_dependency"), r.text
    # the local cluster has no scheduler to wait: it refuses rather than ignore the dependency
    r = _post(env, "/v1/jobs", f"#!/bin/sh\n#SBATCH -t 1 --dependency=afterok:{first['id']}\ntrue\n")
    assert (r.status_code, r.json()["code"]) == (422, "unsupported_request"), r.text
