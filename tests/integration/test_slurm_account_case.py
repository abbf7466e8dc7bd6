"""An allocation whose account is written in upper case, against the real scheduler of
each dev release, through both Slurm adapters.

Slurm folds account names to lower case (``sacctmgr add account AIFA-Case`` creates
``aifa-case``; ``sbatch --account=AIFA-Case`` runs under ``aifa-case``; squeue, sacct
and slurmdb report ``aifa-case``). The broker keeps the name as the quota manager
wrote it, so everything that compares a scheduler's account with an allocation's
must do so as Slurm does: the reconciler adopting a job whose submit outcome was
lost (else it would "prove" a running job absent and release its reservation), and
the usage import attributing a direct job to its allocation (else it is never
charged)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import slurm
from tests.support.env import broker_env
from tests.support.jobs import crash_after_submit

ACCOUNT = "AIFA-Case"
CODE = "EHPC-CASE-001"


@pytest.mark.slurm
@pytest.mark.parametrize("target", slurm.params())
def test_an_upper_case_account_is_the_one_slurm_reports(target: tuple[str, str], tmp_path: Path) -> None:
    release, adapter = target
    slurm.require_cluster(release)
    slurm.ensure_account(release, ACCOUNT.lower(), ("alice",))
    started = datetime.now(UTC)
    definition = slurm.definition(release, adapter)
    definition["poll_interval_seconds"] = 1
    with broker_env(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite3'}", usage_import_interval_seconds=3600,
                    reconcile_absent_seconds=60.0, usage_lookback_hours=1.0) as env:
        r = env.call("POST", "/v1/clusters", env.qm, json=definition)
        assert r.status_code == 201, r.text
        alloc = env.setup_project(CODE, amount=100, unit="core_hours", cluster=definition["name"], account=ACCOUNT)
        alice = env.auth("alice")

        # a job whose submit outcome was lost is adopted, not declared absent
        lost = crash_after_submit(env, "#!/bin/bash\nsleep 1\n", reach_cluster=True, project=CODE)
        done = env.wait_settled(lost, alice, timeout=90)
        assert done["state"] == "COMPLETED" and done["scheduler_job_id"], done

        # a direct job on the account is charged to this allocation by the usage import
        direct = slurm.run_in(release, "sbatch", "--parsable", "--uid=alice", f"--account={ACCOUNT.lower()}",
                              "--partition=cpu", "--time=1", "-o", "/dev/null", "--wrap", "sleep 1").strip().split(";")[0]
        deadline = time.monotonic() + 60
        while slurm.sacct_job(release, direct).get("State") != "COMPLETED":
            assert time.monotonic() < deadline, slurm.sacct_job(release, direct)
            time.sleep(1)
        importer = env.app.state.tracker.importer
        deadline = time.monotonic() + 60
        while True:
            importer.run_cycle(force=True)
            with env.engine.connect() as conn:
                row = conn.execute(sa.text(
                    "SELECT allocation_id, charged FROM imported_jobs WHERE scheduler_job_id = :j"),
                    {"j": direct}).first()
            if row is not None or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert row is not None, f"direct job {direct} under {ACCOUNT.lower()} never imported"
        assert row.allocation_id == alloc["id"] and row.charged > 0, row
        assert datetime.now(UTC) - started < timedelta(minutes=5)


@pytest.mark.slurm
@pytest.mark.parametrize("release", slurm.RELEASES)
def test_find_by_tag_narrowed_to_accounts_reads_the_queue_of_those_accounts(release: str) -> None:
    """The reconciler's lookup names the waiting jobs' accounts: a queued job (a held
    job is in no accounting window) is found under its own account, in the lower case
    the broker stores, and not under another (squeue --account, sacct --accounts)."""
    from adapters.slurm_ssh import SlurmSSHAdapter
    from broker.adapter import JobSpec
    from tests.contract.factory_slurm_ssh import load_connection

    slurm.require_cluster(release)
    slurm.ensure_account(release, ACCOUNT.lower(), ("alice",))
    adapter = SlurmSSHAdapter(f"case-{release}", load_connection(release) or {}, data_dir="/tmp")
    tag = uuid.uuid4().hex
    spec = JobSpec(tag=tag, username="alice", account=ACCOUNT.lower(), script="#!/bin/bash\nsleep 120\n",
                   time_limit_minutes=5, name="case", partition="cpu")
    ref = adapter.submit(spec)
    try:
        slurm.run_in(release, "scontrol", "hold", ref.job_id)
        since = datetime.now(UTC) - timedelta(minutes=5)
        found = adapter.find_by_tag([tag], since=since, accounts=[ACCOUNT.lower()])
        assert found[tag].job_id == ref.job_id and found[tag].account == ACCOUNT.lower()
        assert adapter.find_by_tag([tag], since=since, accounts=["proj-b"]) == {}
    finally:
        adapter.cancel(ref)
        adapter.close()
