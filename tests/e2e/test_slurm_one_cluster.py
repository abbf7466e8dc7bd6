"""One Slurm cluster registered twice (``-ssh`` and ``-rest``, as the README shows):
both definitions discover the same scheduler identity at registration; a direct
``sbatch`` job is imported exactly once whichever definition sees it; a job
submitted through one definition is never imported through the other. Plus the
adapter-backed checks: ``account map`` of a POSIX user the cluster lacks and a
grant on a Slurm account it lacks are refused. Per release, against the dev clusters."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import slurm
from tests.support.env import broker_env

pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("release", slurm.RELEASES, ids=[f"both-{r}" for r in slurm.RELEASES])
def test_one_slurm_cluster_two_definitions_one_charge(release: str, tmp_path: Path) -> None:
    slurm.require_cluster(release)
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    # its own account and 15 minutes back: this test's jobs, never the bursts others leave in proj-a
    slurm.ensure_account(release, slurm.E2E_ACCOUNT, ("alice", "bob"))
    with broker_env(tmp_path, url, run_tracker=False, usage_lookback_hours=0.25) as env:
        names = []
        for adapter in slurm.ADAPTERS:
            definition = slurm.definition(release, adapter)
            r = env.call("POST", "/v1/clusters", env.qm, json=definition)
            assert r.status_code == 201, r.text
            names.append(definition["name"])
        with env.engine.connect() as conn:
            identities = {n: i for n, i in conn.execute(sa.text(
                "SELECT name, scheduler_identity FROM clusters WHERE name != 'local'"))}
        info_name = f"dev{release.replace('.', '')}"
        assert set(identities.values()) == {f"slurm:{info_name}@vm"}, identities

        # adapter-backed checks at mapping and grant time (through each definition)
        for name in names:
            r = env.call("PUT", f"/v1/clusters/{name}/accounts/nobody", env.qm, json={"username": "no-such-user"})
            assert r.status_code == 422 and "no user 'no-such-user'" in r.json()["detail"], r.text
            mapped = env.call("GET", f"/v1/clusters/{name}/accounts", env.qm).json()
            assert "nobody" not in {a["user"] for a in mapped}  # nothing half-done
        r = env.call("POST", "/v1/projects", env.qm, json={"code": "EHPC-ONE-1", "title": "t"})
        assert r.status_code == 201
        r = env.call("POST", "/v1/projects/EHPC-ONE-1/allocations", env.qm, json={
            "cluster": names[0], "unit": "core_hours", "amount": 5, "account": "no-such-account"})
        assert r.status_code == 422 and "no account 'no-such-account'" in r.json()["detail"], r.text

        # one project, one allocation per definition, both on the e2e tests' Slurm account
        env.setup_project("EHPC-ONE-2", amount=100, unit="core_hours", members=("alice", "bob"),
                          cluster=names[0], account=slurm.E2E_ACCOUNT)
        for user in ("alice", "bob"):
            assert env.call("PUT", f"/v1/clusters/{names[1]}/accounts/{user}", env.qm,
                            json={"username": user}).status_code == 200
        r = env.call("POST", "/v1/projects/EHPC-ONE-2/allocations", env.qm, json={
            "cluster": names[1], "unit": "core_hours", "amount": 100, "account": slurm.E2E_ACCOUNT})
        assert r.status_code == 201 and r.json()["warnings"] == [], r.text
        # another project on the same Slurm account of the same machine is refused
        env.call("POST", "/v1/projects", env.qm, json={"code": "EHPC-ONE-3", "title": "t"})
        r = env.call("POST", "/v1/projects/EHPC-ONE-3/allocations", env.qm, json={
            "cluster": names[1], "unit": "core_hours", "amount": 1, "account": slurm.E2E_ACCOUNT})
        assert r.status_code == 409 and "EHPC-ONE-2" in r.json()["detail"], r.text

        # a broker job through the -rest definition, a direct sbatch job beside it
        r = env.call("POST", "/v1/jobs", env.auth("alice"), json={
            "project": "EHPC-ONE-2", "cluster": names[1], "script": "#!/bin/bash\nsleep 1\n",
            "time_limit_minutes": 2})
        assert r.status_code == 201, r.text
        broker_job = r.json()["scheduler_job_id"]
        direct = slurm.run_in(release, "sbatch", "--parsable", "--uid=bob", f"--account={slurm.E2E_ACCOUNT}",
                              "--partition=cpu", "--time=2", "--wrap=sleep 2", "-o", "/dev/null")
        direct = direct.strip().split(";")[0]
        tracker = env.app.state.tracker
        deadline = time.monotonic() + 120
        rows: list[tuple[str, int]] = []
        while time.monotonic() < deadline:
            tracker.run_cycle(force=True)  # settles the broker job
            tracker.importer.run_cycle(force=True)
            with env.engine.connect() as conn:
                rows = list(conn.execute(sa.text(
                    "SELECT scheduler_job_id, cluster_id FROM imported_jobs WHERE scheduler_job_id IN (:a, :b)"),
                    {"a": direct, "b": broker_job}))
                settled = conn.execute(sa.text("SELECT settled_at FROM jobs")).scalar()
            if rows and settled is not None:
                break
            time.sleep(1)
        assert [r[0] for r in rows] == [direct], rows  # the direct job once; the broker job never
        for _ in range(2):  # further cycles (through either definition) import nothing again
            tracker.importer.run_cycle(force=True)
        with env.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM imported_jobs WHERE scheduler_job_id = :a"),
                                {"a": direct}).scalar() == 1
            # other direct jobs of the account (earlier e2e runs) are imported too: each exactly once
            assert list(conn.execute(sa.text("SELECT scheduler_job_id, submit_time FROM imported_jobs GROUP BY "
                                             "scheduler_job_id, submit_time HAVING COUNT(*) > 1"))) == []
            charged = conn.execute(sa.text("SELECT COUNT(*) FROM imported_jobs WHERE charged > 0")).scalar()
            assert conn.execute(sa.text("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'import'")).scalar() \
                == charged
