"""``aifa-broker cluster import-accounts`` on the real dev clusters proposes exactly the
cluster's accounts (Slurm's ``root`` aside), the users associated with them and those
associations — compared with sacctmgr's own listing — then applies, idempotently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker import config
from broker.cli import app
from tests.support import slurm
from tests.support.env import broker_env

RELEASES = ("22.05", "24.11", "26.05")


def _sacctmgr_view(release: str) -> tuple[set[str], set[tuple[str, str]]]:
    """(accounts with an association on the cluster, except root; {(user, account)} under
    them) as sacctmgr lists them (an account record left without associations is not
    the cluster's)."""
    rows = [line.split("|") for line in slurm.run_in(release, "sacctmgr", "-nP", "show", "assoc",
                                                      "format=account,user").splitlines() if line.strip()]
    accounts = {r[0] for r in rows if len(r) > 1 and not r[1]} - {"root"}
    return accounts, {(r[1], r[0]) for r in rows if len(r) > 1 and r[1] and r[0] in accounts}


@pytest.mark.parametrize(("release", "adapter"), [
    pytest.param(r, a, id=f"import-accounts-{a.split('_')[1]}-{r}", marks=pytest.mark.slurm)
    for r in RELEASES for a in ("slurm_ssh", "slurm_rest")])
def test_import_accounts_proposes_exactly_the_clusters_accounts_and_users(
        release: str, adapter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slurm.require_cluster(release)
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    with broker_env(tmp_path, url, run_tracker=False) as env:
        definition = slurm.definition(release, adapter)
        definition["connection"].setdefault("admin_username", "aifa-admin")
        r = env.call("POST", "/v1/clusters", env.qm, json=definition)
        assert r.status_code == 201, r.text
        name = definition["name"]
        monkeypatch.setenv("AIFA_BROKER_DATA_DIR", str(env.settings.data_dir))
        monkeypatch.setenv("AIFA_BROKER_DATABASE_URL", url)
        config.get_settings.cache_clear()
        runner = CliRunner()

        def run(*args: str) -> dict:
            out = runner.invoke(app, ["cluster", "import-accounts", name, "--json", *args])
            assert out.exit_code == 0, out.output
            return dict(json.loads(out.output))

        try:
            # other tests may add their own aifa-t-* accounts meanwhile: compare with the
            # listing before and after (what is stable in both must be proposed exactly)
            before = _sacctmgr_view(release)
            dry = run()
            after = _sacctmgr_view(release)
            proposed = {i["key"] for i in dry["items"] if i["kind"] == "project"}
            users = {i["key"] for i in dry["items"] if i["kind"] == "user"}
            members = {tuple(i["key"].split("@")) for i in dry["items"] if i["kind"] == "membership"}
            assert before[0] & after[0] <= proposed <= before[0] | after[0]
            assert {"proj-a", "proj-b"} <= proposed and "root" not in proposed
            assert before[1] & after[1] <= members <= before[1] | after[1]
            assert {("alice", "proj-a"), ("bob", "proj-a"), ("bob", "proj-b")} <= members
            assert users == {u for u, _ in members}
            assert all(i["status"] == "new" for i in dry["items"]), dry
            assert env.call("GET", "/v1/projects/proj-a", env.qm).status_code == 404  # a dry run

            applied = run("--apply")
            assert applied["applied"] and applied["changes"] == dry["changes"]
            project = env.call("GET", "/v1/projects/proj-a", env.qm).json()
            assert {m["user"] for m in project["members"]} >= {"alice", "bob"}
            accounts = {a["user"]: a["username"]
                        for a in env.call("GET", f"/v1/clusters/{name}/accounts", env.qm).json()}
            assert accounts["alice"] == "alice" and accounts["bob"] == "bob"
            again = run("--apply")
            new = [i for i in again["items"] if i["status"] != "exists"
                   and not i["key"].split("@")[-1].startswith("aifa-t-")]  # others' test accounts
            assert new == [], new
        finally:
            config.get_settings.cache_clear()
