"""Slurm-native enforcement against the real dev clusters (slurm_ssh, sacctmgr as the
dev operator ``aifa-admin``): dry run changes nothing → enabling creates the account,
the members' associations and the GrpTRESMins limit → a second sync is a no-op →
the grant used up through the broker makes Slurm itself hold a DIRECT sbatch under
that account (AssocGrp* reason) → a membership that ends loses its association → an
allocation that ends loses its account. Every test uses its own ``aifa-t-<random>``
account and removes it; proj-a/proj-b are never touched."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support import slurm
from tests.support.env import BrokerEnv, broker_env

ENFORCE_RELEASES = ("22.05", "24.11", "26.05")
CODE = "EHPC-ENF-001"


def _assoc(release: str, account: str) -> dict[str | None, str]:
    """user (None = the account row) → GrpTRESMins, straight from sacctmgr."""
    out = slurm.run_in(release, "sacctmgr", "-nP", "show", "assoc", "where", f"account={account}",
                       "format=account,user,grptresmins")
    rows: dict[str | None, str] = {}
    for line in out.splitlines():
        acct, user, limit = ([*line.split("|"), "", "", ""])[:3]
        if acct == account.lower():  # Slurm folds account names to lower case
            rows[user or None] = limit
    return rows


def _cleanup(release: str, account: str) -> None:
    """Safety net if a test failed half-way: no job, association or account left behind."""
    slurm.run_in(release, "scancel", f"--account={account.lower()}", check=False)
    if _assoc(release, account):
        slurm.run_in(release, "sacctmgr", "-i", "remove", "user", "where", f"account={account.lower()}", check=False)
    # the sync removes the account's associations on its cluster; the record itself
    # (shared by every cluster of a slurmdbd) is this test's own: remove it too
    slurm.run_in(release, "sacctmgr", "-i", "remove", "account", "where", f"name={account.lower()}", check=False)


@contextmanager
def _enforced_env(release: str, tmp_path: Path, *, adapter: str = "slurm_ssh", enforce: bool = False,
                  account_prefix: str = "aifa-t-", **overrides: Any) -> Iterator[tuple]:
    slurm.require_cluster(release)
    account = f"{account_prefix}{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    try:
        with broker_env(tmp_path, url, usage_import_interval_seconds=3600, **overrides) as env:
            definition = slurm.definition(release, adapter)
            definition["poll_interval_seconds"] = 1
            definition["enforce_budgets"] = enforce
            definition["connection"].setdefault("admin_username", "aifa-admin")
            r = env.call("POST", "/v1/clusters", env.qm, json=definition)
            assert r.status_code == 201, r.text
            cluster = definition["name"]
            # 0.05 GPU-hours = exactly 3 GPU-minutes
            alloc = env.setup_project(CODE, amount=0.05, unit="gpu_hours", members=("alice", "bob"),
                                      cluster=cluster, account=account)
            yield env, release, cluster, account, alloc
    finally:
        # after the broker (and its tracker, which would re-create the account) has stopped
        _cleanup(release, account)


_PARAMS = [pytest.param((r, "slurm_ssh"), id=f"enforcement-ssh-{r}", marks=pytest.mark.slurm)
           for r in ENFORCE_RELEASES]
# slurmrestd writes associations from v0.0.40 on (24.11, 26.05); 22.05's is read-only
_PARAMS += [pytest.param((r, "slurm_rest"), id=f"enforcement-rest-{r}", marks=pytest.mark.slurm)
            for r in ("24.11", "26.05")]


@pytest.fixture(params=_PARAMS)
def enforced(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    # the tracker's own sync is tested separately: here every sync is called explicitly
    # enforcing from registration on (the grant of an account Slurm does not have yet is
    # accepted then: the sync creates it); the tracker's first sync is an hour away
    release, adapter = request.param
    with _enforced_env(release, tmp_path, adapter=adapter, enforce=True, enforcement_interval_seconds=3600) as made:
        yield made


def _sync(env: BrokerEnv, cluster: str, *, dry_run: bool = False) -> dict[str, Any]:
    r = env.call("POST", f"/v1/clusters/{cluster}/enforcement/sync", env.qm, params={"dry_run": dry_run})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_enforcement_lifecycle_on_real_slurm(enforced) -> None:  # type: ignore[no-untyped-def]
    env, release, cluster, account, alloc = enforced

    # switched off, a real sync is refused; the drift report (a dry run) changes nothing
    r = env.call("PATCH", f"/v1/clusters/{cluster}", env.qm, json={"enforce_budgets": False})
    assert r.status_code == 200 and r.json()["enforce_budgets"] is False
    r = env.call("POST", f"/v1/clusters/{cluster}/enforcement/sync", env.qm)
    assert r.status_code == 409 and r.json()["code"] == "enforcement_disabled"
    drift = env.call("GET", f"/v1/clusters/{cluster}/enforcement", env.qm).json()
    assert [(c["action"], c["user"]) for c in drift["changes"]] == [
        ("add_account", None), ("add_association", "alice"), ("add_association", "bob")]
    assert drift["changes"][0]["grp_tres_mins"] == {"gres/gpu": 3}
    assert _assoc(release, account) == {}, "a dry run must not change Slurm"
    assert env.call("GET", f"/v1/clusters/{cluster}/enforcement", env.auth("alice")).status_code == 403

    # enable → account, associations and the limit appear in sacctmgr
    r = env.call("PATCH", f"/v1/clusters/{cluster}", env.qm, json={"enforce_budgets": True})
    assert r.status_code == 200 and r.json()["enforce_budgets"] is True
    first = _sync(env, cluster)
    assert first["applied"] and len(first["changes"]) == 3
    assert _assoc(release, account) == {None: "gres/gpu=3", "alice": "", "bob": ""}
    # a second sync is a no-op
    again = _sync(env, cluster)
    assert again["changes"] == [] and again["applied"] is False
    metrics = env.call("GET", "/metrics").text
    assert f'aifa_enforcement_drift{{cluster="{cluster}"}} 0.0' in metrics

    # use the grant up through the broker: one GPU for 3 minutes reserves all 3 GPU-minutes
    alice = env.auth("alice")
    r = env.call("POST", "/v1/jobs", alice, json={
        "project": CODE, "cluster": cluster, "partition": "gpu", "gpus_per_node": 1,
        "script": "#!/bin/bash\nsleep 170\n", "time_limit_minutes": 3})
    assert r.status_code == 201, r.text
    broker_job = r.json()["id"]
    env.wait_job(broker_job, alice, lambda j: j["state"] == "RUNNING", timeout=60)
    assert env.call("GET", f"/v1/projects/{CODE}", alice).json()["allocations"][0]["remaining"] == 0
    r = env.call("POST", "/v1/jobs", alice, json={
        "project": CODE, "cluster": cluster, "partition": "gpu", "gpus_per_node": 1,
        "script": "#!/bin/bash\ntrue\n", "time_limit_minutes": 1})
    assert r.status_code == 409 and r.json()["code"] == "quota_exceeded"
    # ...and Slurm itself holds a job submitted directly, bypassing the broker
    out = slurm.run_in(release, "sbatch", "--parsable", "--uid=alice", f"--account={account}",
                       "--partition=gpu", "--gres=gpu:1", "--time=1", "--wrap=true", "-o", "/dev/null")
    direct = out.strip().split(";")[0]
    try:
        reason, state = "", ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not reason.startswith("AssocGrp"):
            line = slurm.run_in(release, "squeue", "-h", "-j", direct, "-o", "%T|%r").strip()
            state, _, reason = line.partition("|")
            time.sleep(1)
        assert state == "PENDING" and reason.startswith("AssocGrp"), (state, reason)
    finally:
        slurm.run_in(release, "scancel", direct, check=False)
    assert env.call("DELETE", f"/v1/jobs/{broker_job}", alice).status_code in (200, 202, 204)
    done = env.wait_settled(broker_job, alice, timeout=90)
    assert done["state"] == "CANCELLED" and 0 < done["charged"]["amount"] <= 0.05
    assert _sync(env, cluster)["changes"] == []  # still in sync after real usage

    # a membership ends → its association goes, the others stay
    r = env.call("DELETE", f"/v1/projects/{CODE}/members/bob", env.qm)
    assert r.status_code == 204
    plan = _sync(env, cluster)
    assert [(c["action"], c["user"]) for c in plan["changes"]] == [("remove_association", "bob")]
    assert _assoc(release, account) == {None: "gres/gpu=3", "alice": ""}

    # the allocation ends → its associations and then its account go
    yesterday = (date.today() - timedelta(days=1)).isoformat()
    r = env.call("PATCH", f"/v1/projects/{CODE}/allocations/{alloc['id']}", env.qm,
                 json={"start_date": (date.today() - timedelta(days=30)).isoformat(), "end_date": yesterday})
    assert r.status_code == 200, r.text
    plan = _sync(env, cluster)
    assert [(c["action"], c["user"]) for c in plan["changes"]] == [
        ("remove_association", "alice"), ("remove_account", None)]
    assert _assoc(release, account) == {}
    assert _sync(env, cluster)["changes"] == []


@pytest.mark.parametrize("target", _PARAMS)
def test_tracker_runs_the_sync_on_its_lease(target: tuple[str, str], tmp_path: Path) -> None:
    # an account named in upper case: Slurm folds it, the sync must not see drift forever
    with _enforced_env(target[0], tmp_path, adapter=target[1], enforce=True, enforcement_interval_seconds=1,
                       account_prefix="AIFA-T-") as made:
        env, release, cluster, account, alloc = made
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _assoc(release, account) != {None: "gres/gpu=3", "alice": "",
                                                                             "bob": ""}:
            time.sleep(0.5)
        assert _assoc(release, account) == {None: "gres/gpu=3", "alice": "", "bob": ""}
        # a new grant reaches Slurm's limit without anyone calling sync
        r = env.call("PATCH", f"/v1/projects/{CODE}/allocations/{alloc['id']}", env.qm, json={"amount": 0.1})
        assert r.status_code == 200, r.text
        while time.monotonic() < deadline + 30 and _assoc(release, account).get(None) != "gres/gpu=6":
            time.sleep(0.5)
        assert _assoc(release, account).get(None) == "gres/gpu=6"
        status = env.call("GET", f"/v1/clusters/{cluster}", env.qm).json()["enforcement_status"]
        assert status["error"] is None and status["applied_at"]
        assert _sync(env, cluster)["changes"] == []


@pytest.mark.slurm
def test_slurmrestd_of_2205_reads_but_refuses_to_write(tmp_path: Path) -> None:
    """v0.0.38 answers success to a limit change and changes nothing: the broker says so."""
    with _enforced_env("22.05", tmp_path, adapter="slurm_rest", enforce=True,
                       enforcement_interval_seconds=3600) as made:
        env, release, cluster, account, _ = made
        drift = env.call("GET", f"/v1/clusters/{cluster}/enforcement", env.qm)
        assert drift.status_code == 200, drift.text
        assert [c["action"] for c in drift.json()["changes"]] == ["add_account", "add_association",
                                                                  "add_association"]
        r = env.call("POST", f"/v1/clusters/{cluster}/enforcement/sync", env.qm)
        assert r.status_code == 422 and r.json()["code"] == "enforcement_unsupported"
        assert "v0.0.38" in r.json()["detail"] and "slurm_ssh" in r.json()["detail"]
        assert _assoc(release, account) == {}


@pytest.mark.parametrize("target", [p for p in _PARAMS if p.id in {"enforcement-ssh-22.05", "enforcement-ssh-24.11",
                                                                   "enforcement-rest-24.11"}])
def test_a_member_leaving_their_default_account_keeps_the_others(target: tuple[str, str], tmp_path: Path) -> None:
    """Slurm 24.11+ refuses to remove a user's default account (22.05 leaves the user
    without one): the sync first makes one of the user's remaining accounts the default."""
    suffix = uuid.uuid4().hex[:8]
    other, posix = f"aifa-t-{suffix}", f"aifa-t-u{suffix}"
    with _enforced_env(target[0], tmp_path, adapter=target[1], enforce=True,
                       enforcement_interval_seconds=3600) as made:
        env, release, cluster, account, _ = made
        try:
            env.setup_project("EHPC-ENF-002", amount=0.05, unit="gpu_hours", members=(), cluster=cluster,
                              account=other)
            for code in (CODE, "EHPC-ENF-002"):
                r = env.call("POST", f"/v1/projects/{code}/members", env.qm, json={"user": "carol"})
                assert r.status_code == 201, r.text
            # Slurm's accounting needs no POSIX account (the API's mapping checks one exists,
            # and the dev clusters have only alice and bob, whose defaults must not change)
            from broker.db import session_scope
            from broker.services.clusters import map_account

            with session_scope(env.engine) as session:
                map_account(session, principal=None, cluster_name=cluster, user_name="carol", username=posix)
            first = sorted([account, other])[0]
            assert _sync(env, cluster)["applied"]
            default = slurm.run_in(release, "sacctmgr", "-nP", "show", "user", "where", f"name={posix}",
                                   "format=defaultaccount").strip()
            assert default == first  # a new Slurm user's default is its first account
            leave = CODE if first == account else "EHPC-ENF-002"
            keep = other if first == account else account
            assert env.call("DELETE", f"/v1/projects/{leave}/members/carol", env.qm).status_code == 204
            plan = _sync(env, cluster)
            assert [(c["action"], c["account"], c["user"]) for c in plan["changes"]] == [
                ("remove_association", first, posix)]
            assert posix not in _assoc(release, first) and posix in _assoc(release, keep)
            default = slurm.run_in(release, "sacctmgr", "-nP", "show", "user", "where", f"name={posix}",
                                   "format=defaultaccount").strip()
            assert default == keep
            assert _sync(env, cluster)["changes"] == []
        finally:
            _cleanup(release, other)
            slurm.run_in(release, "sacctmgr", "-i", "remove", "user", "where", f"name={posix}", check=False)
