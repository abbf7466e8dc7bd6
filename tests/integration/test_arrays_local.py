"""Job arrays end to end on the embedded `local` cluster (issue 8 point 5), on SQLite
and PostgreSQL: one broker job per array, priced tasks × per task, tracked and
charged per task (each task's share of the reservation released as it ends), one
task or the whole array cancelled, never charged again by the usage import."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session
from typer.testing import CliRunner

from adapters.local import LocalAdapter
from broker import plugins
from broker.adapter import JobStatus, SchedulerJobRef
from broker.cli import app
from broker.services import ledger
from tests.support.env import LOCAL_TEST_CONNECTION, BrokerEnv, broker_env
from tests.support.server import live_server

PROJECT = "EHPC-TEST-001"


def _submit(env: BrokerEnv, script: str, who: str = "alice", **over: object) -> Any:
    return env.call("POST", "/v1/jobs", env.auth(who), json={"project": PROJECT, "script": script, **over})


def _tasks(env: BrokerEnv, job_id: str, who: str = "alice") -> list[dict[str, Any]]:
    r = env.call("GET", f"/v1/jobs/{job_id}/tasks", env.auth(who))
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


def _ledger(env: BrokerEnv, job_id: str) -> list[tuple[str, int, int]]:
    with env.engine.connect() as conn:
        return [(k, int(t), int(a)) for k, t, a in conn.execute(sa.text(
            "SELECT kind, task, amount FROM ledger_entries WHERE job_id = :j ORDER BY id"), {"j": job_id})]


def _ledger_clean(env: BrokerEnv) -> None:
    with Session(env.engine) as session:
        assert ledger.check(session) == []


def test_array_runs_throttled_and_each_task_is_charged_once(env: BrokerEnv) -> None:
    env.setup_project(unit="core_hours", amount=100)
    script = "#!/bin/sh\n#SBATCH --array=0-6:2%2 -c 2 -t 60\necho task=$SLURM_ARRAY_TASK_ID\nsleep 1\n"
    r = _submit(env, script)
    assert r.status_code == 201, r.text
    job = r.json()
    # 4 tasks (0, 2, 4, 6) × 2 CPUs × 1 h: the reservation covers what Slurm allocates for the time limit
    assert job["reserved"]["amount"] == 8.0 and job["estimated_cost"]["amount"] == 8.0
    assert job["array"]["spec"] == "0-6:2%2" and job["array"]["tasks"] == 4
    assert job["array"]["max_running"] == 2
    most = 0
    while True:
        tasks = _tasks(env, job["id"])
        most = max(most, sum(1 for t in tasks if t["state"] == "RUNNING"))
        if all(t["charged"] is not None for t in tasks):
            break
        env.wait_job(job["id"], env.auth("alice"), lambda j: True)
    assert most <= 2
    done = env.wait_settled(job["id"], env.auth("alice"))
    assert done["state"] == "COMPLETED" and done["exit_code"] == 0
    assert done["array"]["counts"] == {"COMPLETED": 4} and done["reserved"]["amount"] == 0
    tasks = _tasks(env, job["id"])
    assert [t["task"] for t in tasks] == [0, 2, 4, 6]
    sid = done["scheduler_job_id"]
    for t in tasks:
        assert t["scheduler_job_id"] == f"{sid}_{t['task']}" and t["state"] == "COMPLETED"
        assert t["reserved"]["amount"] == 0
        assert abs(t["charged"]["amount"] - 2 * t["elapsed_seconds"] / 3600) < 2e-6
    assert abs(done["charged"]["amount"] - sum(t["charged"]["amount"] for t in tasks)) < 4e-6
    rows = _ledger(env, job["id"])
    assert [k for k, _, _ in rows].count("reserve") == 1
    releases = [(t, a) for k, t, a in rows if k == "release"]
    charges = [t for k, t, _ in rows if k == "charge"]
    assert sorted(t for t, _ in releases) == [0, 2, 4, 6] and sorted(charges) == [0, 2, 4, 6]
    assert sum(a for _, a in releases) == next(a for k, _, a in rows if k == "reserve")
    _ledger_clean(env)
    report = env.call("GET", f"/v1/projects/{PROJECT}/usage", env.auth("alice")).json()["rows"]
    assert [row["jobs"] for row in report] == [1]  # one job (of four tasks, four charge rows)
    out = env.call("GET", f"/v1/jobs/{job['id']}/output?task=4", env.auth("alice"))
    assert out.status_code == 200 and out.text.strip() == "task=4"
    # the usage import sees the tasks (each under its own id) and knows they are the broker's
    env.app.state.tracker.importer.run_cycle(force=True)
    with env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM imported_jobs")).scalar_one() == 0
    _ledger_clean(env)


def test_budget_must_cover_every_task(env: BrokerEnv) -> None:
    env.setup_project(unit="core_hours", amount=3)
    r = _submit(env, "#!/bin/sh\n#SBATCH --array=0-3\n#SBATCH -t 60\ntrue\n")
    assert (r.status_code, r.json()["code"]) == (409, "quota_exceeded"), r.text
    assert r.json()["estimated_cost"]["amount"] == 4.0
    with env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM job_tasks")).scalar_one() == 0
    # the JSON field overrides the script's --array (as sbatch's command line): 2 tasks fit
    est = env.call("POST", "/v1/jobs/estimate", env.auth("alice"), json={
        "project": PROJECT, "script": "#!/bin/sh\n#SBATCH --array=0-3 -t 60\ntrue\n", "array": "5,7"}).json()
    assert est["allowed"] and est["estimated_cost"]["amount"] == 2.0, est
    ok = _submit(env, "#!/bin/sh\n#SBATCH --array=0-3 -t 60\ntrue\n", array="5,7")
    assert ok.status_code == 201, ok.text
    assert ok.json()["request"]["sources"]["array"] == "json" and ok.json()["array"]["tasks"] == 2
    assert [t["task"] for t in _tasks(env, ok.json()["id"])] == [5, 7]
    for bad in ("0-20000", "3-1", "1%0", "x"):
        r = _submit(env, "#!/bin/sh\ntrue\n", time_limit_minutes=60, array=bad)
        assert (r.status_code, r.json()["code"]) == (422, "validation_error"), (bad, r.text)
    big = _submit(env, "#!/bin/sh\n#SBATCH --array=0-20000\n#SBATCH -t 1\ntrue\n")
    assert (big.status_code, big.json()["code"]) == (422, "unsupported_directive"), big.text


def test_cancel_one_task_then_the_whole_array(env: BrokerEnv) -> None:
    env.setup_project(unit="core_hours", amount=100, members=("alice",))
    env.setup_project("EHPC-TEST-002", members=("bob",), account="proj-b")
    r = _submit(env, "#!/bin/sh\n#SBATCH --array=0-2 -t 30\nsleep 60\n")
    assert r.status_code == 201, r.text
    job = r.json()
    share = job["reserved"]["amount"] / 3
    env.wait_job(job["id"], env.auth("alice"), lambda j: j["array"]["counts"] == {"RUNNING": 3})
    assert env.call("DELETE", f"/v1/jobs/{job['id']}/tasks/1", env.auth("bob")).status_code == 404
    assert env.call("GET", f"/v1/jobs/{job['id']}/tasks", env.auth("bob")).status_code == 404
    missing = env.call("DELETE", f"/v1/jobs/{job['id']}/tasks/7", env.auth("alice"))
    assert (missing.status_code, missing.json()["code"]) == (404, "task_not_found")
    r = env.call("DELETE", f"/v1/jobs/{job['id']}/tasks/1", env.auth("alice"))
    assert r.status_code == 202, r.text
    one = env.wait_job(job["id"], env.auth("alice"), lambda j: j["array"]["counts"].get("CANCELLED") == 1)
    assert one["state"] == "RUNNING" and one["array"]["counts"] == {"RUNNING": 2, "CANCELLED": 1}
    assert abs(one["reserved"]["amount"] - 2 * share) < 2e-6  # task 1's share released
    states = {t["task"]: t["state"] for t in _tasks(env, job["id"])}
    assert states == {0: "RUNNING", 1: "CANCELLED", 2: "RUNNING"}
    _ledger_clean(env)
    assert env.call("DELETE", f"/v1/jobs/{job['id']}", env.auth("alice")).status_code == 202
    done = env.wait_settled(job["id"], env.auth("alice"))
    assert done["state"] == "CANCELLED" and done["array"]["counts"] == {"CANCELLED": 3}
    assert done["reserved"]["amount"] == 0
    _ledger_clean(env)
    plain = _submit(env, "#!/bin/sh\n#SBATCH -t 1\ntrue\n").json()
    r = env.call("GET", f"/v1/jobs/{plain['id']}/tasks", env.auth("alice"))
    assert (r.status_code, r.json()["code"]) == (404, "task_not_found")
    assert plain["array"] is None


class _ForgetfulLocal(LocalAdapter):
    """As Slurm does: a task cancelled before it started is not reported any more
    (dropped from the array's pending record, no accounting of it)."""

    def poll(self, refs: Sequence[SchedulerJobRef]) -> list[JobStatus]:
        return [s for s in super().poll(refs) if s.reason != "cancelled before start"]


def test_a_waiting_task_cancelled_and_never_reported_again_ends_after_the_grace(
        tmp_path: Path, db_url: str) -> None:
    with broker_env(tmp_path, db_url, array_cancel_grace_seconds=1.0) as env:
        plugins.register(plugins.ADAPTER_GROUP, "test_forgetful_local", _ForgetfulLocal)
        r = env.call("POST", "/v1/clusters", env.qm, json={
            "name": "local-f", "adapter": "test_forgetful_local", "connection": LOCAL_TEST_CONNECTION,
            "poll_interval_seconds": 0.2})
        assert r.status_code == 201, r.text
        env.setup_project(cluster="local-f")
        r = _submit(env, "#!/bin/sh\n#SBATCH --array=0-2%1 -t 60\nsleep 30\n", cluster="local-f")
        assert r.status_code == 201, r.text
        job = r.json()
        env.wait_job(job["id"], env.auth("alice"), lambda j: j["array"]["counts"].get("RUNNING") == 1)
        assert env.call("DELETE", f"/v1/jobs/{job['id']}/tasks/2", env.auth("alice")).status_code == 202
        one = env.wait_job(job["id"], env.auth("alice"), lambda j: j["array"]["counts"].get("CANCELLED") == 1)
        assert one["state"] == "RUNNING"
        task = {t["task"]: t for t in _tasks(env, job["id"])}[2]
        assert (task["state"], task["charged"]["amount"], task["reserved"]["amount"]) == ("CANCELLED", 0, 0)
        _ledger_clean(env)
        assert env.call("DELETE", f"/v1/jobs/{job['id']}", env.auth("alice")).status_code == 202
        done = env.wait_settled(job["id"], env.auth("alice"))
        assert done["state"] == "CANCELLED" and done["array"]["counts"] == {"CANCELLED": 3}
        assert done["reserved"]["amount"] == 0
        _ledger_clean(env)


def test_cli_shows_task_counts_lists_tasks_and_cancels_one(env: BrokerEnv, tmp_path: Path) -> None:
    env.setup_project()
    script = tmp_path / "sweep.sh"
    script.write_text("#!/bin/sh\n#SBATCH --array=1-3 --time=60\nsleep 30\n")
    runner = CliRunner()
    with live_server(env.app) as base:
        common = {"AIFA_BROKER_URL": base, "AIFA_BROKER_TOKEN": env.token("alice")}
        out = runner.invoke(app, ["job", "submit", str(script), "-p", PROJECT, "--json"], env=common)
        assert out.exit_code == 0, out.output
        job_id = json.loads(out.output)["id"]
        env.wait_job(job_id, env.auth("alice"), lambda j: j["array"]["counts"] == {"RUNNING": 3})
        cancelled = runner.invoke(app, ["job", "cancel", job_id, "--task", "2"], env=common)
        assert cancelled.exit_code == 0 and "task 2" in cancelled.output, cancelled.output
        env.wait_job(job_id, env.auth("alice"), lambda j: j["array"]["counts"].get("CANCELLED") == 1)
        shown = runner.invoke(app, ["job", "show", job_id], env=common)
        assert "array 1-3: 3 tasks — 1 CANCELLED, 2 RUNNING" in shown.output, shown.output
        listed = runner.invoke(app, ["job", "tasks", job_id], env=common)
        lines = [line.split() for line in listed.output.splitlines()]
        assert [(w[0], w[1]) for w in lines] == [("1", "RUNNING"), ("2", "CANCELLED"), ("3", "RUNNING")]
        missing = runner.invoke(app, ["job", "cancel", job_id, "--task", "9"], env=common)
        assert missing.exit_code == 1 and "task_not_found" in missing.output
        assert runner.invoke(app, ["job", "cancel", job_id], env=common).exit_code == 0
        env.wait_settled(job_id, env.auth("alice"))


def test_cancelling_an_array_takes_its_locks_in_the_trackers_order(env: BrokerEnv) -> None:
    """The tracker writes an array's tasks, then the job row (arrays.refresh); the
    array's cancel must lock them in that order too. It locked the job row first, and
    under load the two deadlocked: PostgreSQL aborted one, and the cancel answered 503
    (seen in CI). Here a transaction in the tracker's order holds the tasks while the
    cancel runs, then writes the job row: both must go through."""
    if env.engine.dialect.name != "postgresql":
        pytest.skip("row locks: SQLite locks the whole database, so no lock order can deadlock")
    env.setup_project(unit="core_hours", amount=100, members=("alice",))
    job = _submit(env, "#!/bin/sh\n#SBATCH --array=0-1 -t 30\nsleep 60\n").json()
    env.wait_job(job["id"], env.auth("alice"), lambda j: j["scheduler_job_id"] is not None)
    env.app.state.tracker.stop()
    answers: list[int] = []
    with env.engine.connect() as tracker_like:
        tx = tracker_like.begin()
        tracker_like.execute(sa.text("UPDATE job_tasks SET reason = 'tracker' WHERE job_id = :j"), {"j": job["id"]})
        cancel = threading.Thread(target=lambda: answers.append(
            env.call("DELETE", f"/v1/jobs/{job['id']}", env.auth("alice")).status_code))
        cancel.start()
        deadline = time.monotonic() + 20
        with env.engine.connect() as probe:  # until the cancel waits for a row lock
            while not probe.execute(sa.text(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )).first():
                assert time.monotonic() < deadline and cancel.is_alive(), answers
                time.sleep(0.05)
        tracker_like.execute(sa.text("UPDATE jobs SET last_polled_at = now() WHERE id = :j"), {"j": job["id"]})
        tx.commit()
    cancel.join(timeout=30)
    assert answers == [202]
