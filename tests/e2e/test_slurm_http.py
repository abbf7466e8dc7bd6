"""Over HTTP against real Slurm: submit as alice → accounted under alice and the
project's account → settled charge equals sacct's AllocTRES × elapsed; direct
sbatch usage is imported; slurmctld down → UNKNOWN, back → settled; SIGKILL of the
broker between sbatch and recording → adopted exactly once. Per release × adapter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import slurm
from tests.support.env import BrokerEnv, broker_env

pytestmark = pytest.mark.slurm


@pytest.fixture(params=slurm.params())
def slurm_env(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    release, adapter = request.param
    slurm.require_cluster(release)
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    # the project's Slurm account is the e2e tests' own: the dev cluster's proj-a is shared with
    # the rest of the suite and with benchmarks (bursts of a thousand jobs a minute), whose
    # leftover accounting the usage import would otherwise read (and charge) first; the import
    # looks back 15 minutes, enough for this module's jobs
    slurm.ensure_account(release, slurm.E2E_ACCOUNT, ("alice", "bob"))
    with broker_env(tmp_path, url, usage_import_interval_seconds=2, usage_lookback_hours=0.25,
                    reconcile_grace_seconds=2, reconcile_absent_seconds=60) as env:
        definition = slurm.definition(release, adapter)
        definition["poll_interval_seconds"] = 1
        r = env.call("POST", "/v1/clusters", env.qm, json=definition)
        assert r.status_code == 201, r.text
        cluster = definition["name"]
        assert {p["name"] for p in r.json()["partitions"]} >= {"cpu", "gpu"}
        env.setup_project("EHPC-SLURM-001", amount=100, unit="gpu_hours", members=("alice", "bob"),
                          cluster=cluster, account=slurm.E2E_ACCOUNT)
        yield env, release, cluster


def _submit(env: BrokerEnv, cluster: str, **over: object) -> dict:
    body = {"project": "EHPC-SLURM-001", "cluster": cluster, "script": "#!/bin/bash\nsleep 2\necho ok\n",
            "time_limit_minutes": 5, **over}
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_gpu_job_charged_exactly_what_sacct_accounted(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    job = _submit(env, cluster, partition="gpu", gpus_per_node=2, cpus_per_task=2)
    assert job["estimated_cost"] == {"unit": "gpu_hours", "amount": round(2 * 5 / 60 + 5e-7, 6)} or \
        abs(job["estimated_cost"]["amount"] - 2 * 5 / 60) < 2e-6
    done = env.wait_settled(job["id"], env.auth("alice"), timeout=90)
    assert done["state"] == "COMPLETED" and done["exit_code"] == 0
    acct = slurm.sacct_job(release, done["scheduler_job_id"])
    assert acct["User"] == "alice" and acct["Account"] == slurm.E2E_ACCOUNT and acct["State"] == "COMPLETED"
    gpus = slurm.tres(acct["AllocTRES"]).get("gres/gpu", 0)
    assert gpus == 2
    expected = gpus * int(acct["ElapsedRaw"]) / 3600
    assert done["elapsed_seconds"] == int(acct["ElapsedRaw"])
    assert abs(done["charged"]["amount"] - expected) < 2e-6


def test_direct_sbatch_under_the_project_account_shows_in_usage(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, _cluster = slurm_env
    out = slurm.run_in(release, "sbatch", "--parsable", "--uid=bob", f"--account={slurm.E2E_ACCOUNT}",
                       "--partition=gpu", "--gres=gpu:1", "--time=2", "--wrap=sleep 3", "-o", "/dev/null")
    job_id = out.strip().split(";")[0]
    deadline = time.monotonic() + 120
    row = None
    while row is None and time.monotonic() < deadline:
        with env.engine.connect() as conn:
            row = conn.execute(sa.text("SELECT id, charged, username, global_id FROM imported_jobs "
                                       "WHERE scheduler_job_id=:j"), {"j": job_id}).first()
        time.sleep(1)
    assert row is not None, "the directly submitted job was never imported"
    acct = slurm.sacct_job(release, job_id)
    expected = slurm.tres(acct["AllocTRES"]).get("gres/gpu", 0) * int(acct["ElapsedRaw"]) / 3600
    assert expected > 0 and abs(row.charged / 1e6 - expected) < 2e-6 and row.username == "bob"
    # 26.05 accounting has globally unique job ids: the import keeps (and keys on) them
    assert (row.global_id is not None) == (release >= "26.05"), row
    # the charge is in the project's usage, attributed to bob (mapped on this cluster), exactly once
    usage = env.call("GET", "/v1/projects/EHPC-SLURM-001/usage", env.auth("alice"),
                     params={"group_by": "user"}).json()
    assert "bob" in {r["user"] for r in usage["rows"]}
    time.sleep(3)  # another import cycle must not charge it again
    with env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM ledger_entries WHERE imported_job_id=:i"),
                            {"i": row.id}).scalar() == 1
        assert conn.execute(sa.text("SELECT COUNT(*) FROM imported_jobs WHERE scheduler_job_id=:j"),
                            {"j": job_id}).scalar() == 1


def test_slurmctld_down_makes_jobs_unknown_then_settles(slurm_env) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    alice = env.auth("alice")
    job = _submit(env, cluster, script="#!/bin/bash\nsleep 15\n")
    env.wait_job(job["id"], alice, lambda j: j["state"] == "RUNNING", timeout=60)
    slurm.ctl(release, "stop-slurmctld")
    try:
        unknown = env.wait_job(job["id"], alice, lambda j: j["state"] == "UNKNOWN", timeout=60)
        assert unknown["unknown_since"] and unknown["charged"] is None
        health = env.call("GET", f"/v1/clusters/{cluster}", alice).json()
        assert health["health_ok"] is False and health["unreachable_since"]
    finally:
        slurm.ctl(release, "start-slurmctld")
    done = env.wait_settled(job["id"], alice, timeout=120)
    assert done["state"] == "COMPLETED" and done["unknown_since"] is None


CRASHER = textwrap.dedent("""
    import os, signal, sys
    from broker.auth import Authenticator
    from broker.config import Settings
    from broker.db import make_engine
    from broker.registry import AdapterRegistry
    from broker.schemas import JobRequest
    from broker.services.clusters import adapter_for
    from broker.services.jobs import _reserve
    settings = Settings(data_dir=sys.argv[1], database_url=sys.argv[2], run_tracker=False)
    engine = make_engine(settings.effective_database_url)
    principal = Authenticator(settings).authenticate(sys.argv[3])
    body = JobRequest(project="EHPC-SLURM-001", cluster=sys.argv[4], script="#!/bin/bash\\nsleep 3\\n",
                      time_limit_minutes=5)
    job, spec, cluster = _reserve(engine, settings, principal, body)   # reserved + ACCEPTED, committed
    ref = adapter_for(AdapterRegistry(settings), cluster).submit(spec)  # sbatch done
    print(job.id, ref.job_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)                               # dies before recording
""")


def test_sigkill_between_sbatch_and_record_adopts_once(slurm_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster = slurm_env
    env.app.state.tracker.stop()  # the in-test broker is "down" while the crasher runs
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(env.settings.data_dir),
                           env.settings.effective_database_url, env.token("alice"), cluster],
                          capture_output=True, text=True, timeout=120, cwd=str(slurm.ROOT),
                          env={**os.environ, "PYTHONPATH": str(slurm.ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    job_id, scheduler_id = proc.stdout.split()
    alice = env.auth("alice")
    assert env.job(job_id, alice)["state"] == "ACCEPTED"
    # "restart": a tracker on the same database and data directory
    from broker.tracker import Tracker

    tracker = Tracker(env.engine, env.settings, env.app.state.registry)
    tracker.start()
    try:
        done = env.wait_settled(job_id, alice, timeout=120)
    finally:
        tracker.stop()
    assert done["scheduler_job_id"] == scheduler_id and done["state"] == "COMPLETED"
    with env.engine.connect() as conn:
        kinds = sorted(k for (k,) in conn.execute(sa.text("SELECT kind FROM ledger_entries WHERE job_id=:j"),
                                                  {"j": job_id}))
        assert kinds == ["charge", "release", "reserve"]
        assert conn.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar() == 1
    name_matches = slurm.run_in(release, "sacct", "-X", "-n", "-P", "-a", "-o", "JobID,JobName", "-S", "now-1hour")
    assert sum(job_id in line for line in name_matches.splitlines()) == 1
