"""Operator commands on a real broker (SQLite and PostgreSQL): cluster drain/resume
(no new jobs → 503 ``cluster_unavailable``, tracking goes on), update, remove,
``allocation list|adjust|import`` (JSON and CSV, validated, idempotent), ``plugins``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from broker import config
from broker.cli import app
from tests.support.env import BrokerEnv

Run = Callable[..., "object"]


@pytest.fixture
def ops(env: BrokerEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., object]]:
    """Run ``aifa-broker ARGS`` against the test broker's database and data directory."""
    monkeypatch.setenv("AIFA_BROKER_DATA_DIR", str(env.settings.data_dir))
    monkeypatch.setenv("AIFA_BROKER_DATABASE_URL", env.settings.effective_database_url)
    config.get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> object:
        out = runner.invoke(app, list(args))
        assert out.exit_code == code, (args, out.output)
        return out

    yield run
    config.get_settings.cache_clear()


def _submit(env: BrokerEnv, script: str = "#!/bin/sh\nsleep 1.5\n") -> object:
    # the local test cluster runs "minutes" as seconds: 2 s to finish in
    return env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": "EHPC-TEST-001", "script": script, "time_limit_minutes": 2})


def test_drain_refuses_new_jobs_while_running_ones_settle(env: BrokerEnv, ops) -> None:  # type: ignore[no-untyped-def]
    env.setup_project()
    running = _submit(env).json()  # type: ignore[attr-defined]
    env.wait_job(running["id"], env.auth("alice"), lambda j: j["state"] == "RUNNING")
    out = ops("cluster", "drain", "local")
    assert "draining" in out.output  # type: ignore[attr-defined]
    refused = _submit(env)
    assert refused.status_code == 503 and refused.json()["code"] == "cluster_unavailable"  # type: ignore[attr-defined]
    assert refused.headers["Retry-After"]  # type: ignore[attr-defined]
    assert refused.headers["content-type"].startswith("application/problem+json")  # type: ignore[attr-defined]
    # the job accepted before the drain is still tracked and settled
    assert env.wait_settled(running["id"], env.auth("alice"))["state"] == "COMPLETED"
    assert env.call("GET", "/v1/clusters/local", env.qm).json()["state"] == "draining"
    ops("cluster", "resume", "local")
    assert _submit(env).status_code == 201  # type: ignore[attr-defined]


def test_cluster_update_remove_and_enforcement_refused_by_local(env: BrokerEnv, ops,  # type: ignore[no-untyped-def]
                                                                tmp_path: Path) -> None:
    env.setup_project()
    ops("cluster", "update", "local", "--description", "laptop", "--poll-interval", "0.5")
    got = env.call("GET", "/v1/clusters/local", env.qm).json()
    assert got["description"] == "laptop" and got["poll_interval_seconds"] == 0.5
    ops("cluster", "update", "local", "--enforce-budgets")
    assert env.call("GET", "/v1/clusters/local", env.qm).json()["enforce_budgets"] is True
    # the local adapter has no scheduler accounting: said plainly, not a crash
    out = ops("cluster", "sync", "local", "--dry-run", code=1)
    assert "[enforcement_unsupported]" in out.output  # type: ignore[attr-defined]
    r = env.call("GET", "/v1/clusters/local/enforcement", env.qm)
    assert r.status_code == 422 and r.json()["code"] == "enforcement_unsupported"
    ops("cluster", "update", "local", code=1)  # nothing to change
    changed = tmp_path / "local.json"
    changed.write_text(json.dumps({"name": "local", "adapter": "local", "description": "from a file",
                                   "cost_model": {"partitions": {"*": {"core_hours": {"cpu": 2.0}}}}}))
    ops("cluster", "update", "local", "--from-file", str(changed))
    got = env.call("GET", "/v1/clusters/local", env.qm).json()
    assert got["description"] == "from a file" and got["cost_model"]["partitions"]["*"]["core_hours"] == {"cpu": 2.0}
    changed.write_text(json.dumps({"name": "other"}))
    assert "another cluster" in ops("cluster", "update", "local", "--from-file", str(changed), code=1).output  # type: ignore[attr-defined]
    r = env.call("POST", "/v1/clusters", env.qm, json={"name": "spare", "adapter": "local",
                                                      "connection": {"partitions": [{"name": "cpu", "cpus": 2}]}})
    assert r.status_code == 201, r.text
    ops("cluster", "remove", "spare")
    assert env.call("GET", "/v1/clusters/spare", env.qm).status_code == 404
    out = ops("cluster", "remove", "local", code=1)  # it has an allocation
    assert "[conflict]" in out.output  # type: ignore[attr-defined]


def test_allocation_list_and_adjust(env: BrokerEnv, ops) -> None:  # type: ignore[no-untyped-def]
    alloc = env.setup_project(amount=100)
    listed = json.loads(ops("allocation", "list", "--json").output)  # type: ignore[attr-defined]
    assert [(a["project"], a["granted"], a["remaining"]) for a in listed] == [("EHPC-TEST-001", 100.0, 100.0)]
    assert ops("allocation", "list", "--cluster", "nope", "--json").output.strip() == "[]"  # type: ignore[attr-defined]
    out = ops("allocation", "adjust", str(alloc["id"]), "--amount", "150", "--reason", "mid-term top-up")
    assert "granted 150" in out.output  # type: ignore[attr-defined]
    with env.engine.connect() as conn:
        entry = conn.execute(sa.text("SELECT amount, actor, reason FROM ledger_entries WHERE kind='adjust'")).one()
    assert tuple(entry) == (50_000_000, "cli", "mid-term top-up")
    ops("allocation", "adjust", "999", "--amount", "1", code=1)
    ops("allocation", "adjust", str(alloc["id"]), "--amount", "-1", code=1)
    ops("ledger", "check")


EXPORT = {"projects": [{
    "code": "EHPC-AIF-2026A01-042", "title": "LLM fine-tuning", "status": "active", "access_mode": "fast-lane",
    "start_date": "2026-01-01", "end_date": "2026-12-31",
    "allocations": [{"cluster": "local", "unit": "gpu_hours", "amount": 5000, "account": "aif26a01_042"}],
    "members": [{"user": "alice@example.eu", "role": "pi"}, {"user": "bob@example.eu", "role": "member"}]}]}

CSV = """kind,project,title,status,access_mode,start_date,end_date,cluster,unit,amount,account,user,role
project,EHPC-AIF-2026A01-042,LLM fine-tuning,active,fast-lane,2026-01-01,2026-12-31,,,,,,
allocation,EHPC-AIF-2026A01-042,,,,,,local,gpu_hours,5000,aif26a01_042,,
member,EHPC-AIF-2026A01-042,,,,,,,,,,alice@example.eu,pi
member,EHPC-AIF-2026A01-042,,,,,,,,,,bob@example.eu,member
"""


def _counts(output: str) -> dict[str, object]:
    report = json.loads(output)
    return {"changes": report["changes"], **report["counts"]}


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_allocation_system_import_is_validated_and_idempotent(env: BrokerEnv, ops, tmp_path: Path,
                                                              fmt: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / f"call-results.{fmt}"
    path.write_text(json.dumps(EXPORT) if fmt == "json" else CSV)
    dry = _counts(ops("allocation", "import", str(path), "--json").output)  # type: ignore[attr-defined]
    assert dry == {"changes": 4, "project": {"new": 1}, "allocation": {"new": 1}, "membership": {"new": 2}}
    assert env.call("GET", "/v1/projects/EHPC-AIF-2026A01-042", env.qm).status_code == 404  # dry run
    done = _counts(ops("allocation", "import", str(path), "--apply", "--json").output)  # type: ignore[attr-defined]
    assert done["changes"] == 4
    project = env.call("GET", "/v1/projects/EHPC-AIF-2026A01-042", env.qm).json()
    assert project["access_mode"] == "fast-lane" and project["end_date"] == "2026-12-31"
    assert [(a["cluster"], a["account"], a["granted"]) for a in project["allocations"]] == \
        [("local", "aif26a01_042", 5000.0)]
    assert {(m["user"], m["role"]) for m in project["members"]} == {("alice@example.eu", "pi"),
                                                                    ("bob@example.eu", "member")}
    again = _counts(ops("allocation", "import", str(path), "--apply", "--json").output)  # type: ignore[attr-defined]
    assert again == {"changes": 0, "project": {"exists": 1}, "allocation": {"exists": 1},
                     "membership": {"exists": 2}}
    # a revised export: more hours → one adjust entry, nothing else
    path.write_text(json.dumps(EXPORT).replace("5000", "6000") if fmt == "json" else CSV.replace("5000", "6000"))
    revised = _counts(ops("allocation", "import", str(path), "--apply", "--json").output)  # type: ignore[attr-defined]
    assert revised["changes"] == 1 and revised["allocation"] == {"update": 1}
    with env.engine.connect() as conn:
        kinds = [r[0] for r in conn.execute(sa.text("SELECT kind FROM ledger_entries ORDER BY id"))]
    assert kinds == ["grant", "adjust"]
    ops("ledger", "check")


def test_allocation_import_lists_every_problem_and_applies_nothing(env: BrokerEnv, ops,
                                                                   tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = {"projects": [
        {"code": "OK-1", "title": "fine", "allocations": [{"cluster": "local", "unit": "gpu_hours",
                                                           "amount": 1, "account": "ok"}]},
        {"code": "bad code!", "title": "x"},
        {"code": "OK-2", "title": "y", "allocations": [{"cluster": "local", "unit": "furlongs", "amount": -3,
                                                        "account": "a b"}],
         "members": [{"user": "", "role": "boss"}]}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    out = ops("allocation", "import", str(path), "--apply", code=1).output  # type: ignore[attr-defined]
    for where in ("projects[1]", "projects[2].allocations[0]", "projects[2].members[0]"):
        assert where in out, out
    assert env.call("GET", "/v1/projects/OK-1", env.qm).status_code == 404  # nothing applied
    csv_bad = tmp_path / "bad.csv"
    csv_bad.write_text("kind,project,unit\nwhatever,P-1,\n")
    assert "line 2" in ops("allocation", "import", str(csv_bad), code=1).output  # type: ignore[attr-defined]
    (tmp_path / "x.json").write_text("[1, 2")
    assert "not valid JSON" in ops("allocation", "import", str(tmp_path / "x.json"), code=1).output  # type: ignore[attr-defined]


def test_plugins_lists_adapters_and_policies_with_versions(ops) -> None:  # type: ignore[no-untyped-def]
    rows = json.loads(ops("plugins", "--json").output)  # type: ignore[attr-defined]
    names = {(r["kind"], r["name"]) for r in rows}
    assert {("adapter", "local"), ("adapter", "slurm_ssh"), ("adapter", "slurm_rest"),
            ("policy", "project_active")} <= names
    assert all(r["version"] and r["distribution"] for r in rows)


def test_allocation_grant_stores_the_account_as_slurm_does(env: BrokerEnv, ops) -> None:  # type: ignore[no-untyped-def]
    """``allocation grant --account AIFA-X``: Slurm folds account names to lower case;
    the CLI checks and stores the account in that form, and says so."""
    env.setup_project("EHPC-CLI-CASE", account="proj-a")
    out = ops("allocation", "grant", "EHPC-CLI-CASE", "--cluster", "local", "--amount", "5",
              "--unit", "core_hours", "--account", "CLI-Upper")
    assert "(account cli-upper)" in out.output  # type: ignore[attr-defined]
    project = env.call("GET", "/v1/projects/EHPC-CLI-CASE", env.qm).json()
    assert sorted(a["account"] for a in project["allocations"]) == ["cli-upper", "proj-a"]
