"""A job array end to end through the API on a ``pyslurm`` cluster — the pyslurm
25.11 stand-in (tests/contract/pyslurm_standin), **not a live libslurm**. On SQLite
and PostgreSQL: priced tasks × per task, tracked and charged per task by the
tracker, a waiting task's cancel refused (pyslurm cancels by job number only:
``422 task_not_started``, nothing cancelled), a running task's and the whole
array's cancel honoured, the ledger balanced throughout."""

from __future__ import annotations

import getpass
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from broker.services import ledger
from tests.contract import pyslurm_standin
from tests.contract.pyslurm_standin._sim import CONTROLLER, SimPartition
from tests.support.env import BrokerEnv, broker_env

PROJECT = "EHPC-TEST-001"
CLUSTER = "standin"


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerEnv]:
    monkeypatch.setitem(sys.modules, "pyslurm", pyslurm_standin)
    CONTROLLER.shutdown()
    CONTROLLER.configure([SimPartition("cpu", cpus=4, memory_mb=4096, nodes=2, max_time=120, default=True)],
                         seconds_per_minute=60.0, start_delay=0.2, db_lag=0.3, min_job_age=3.0)
    try:
        with broker_env(tmp_path, db_url) as e:
            r = e.call("POST", "/v1/clusters", e.qm, json={
                "name": CLUSTER, "adapter": "pyslurm", "default_partition": "cpu", "poll_interval_seconds": 1,
                "connection": {"output_pattern": f"{tmp_path}/aifa-%j.out", "set_user_id": False}})
            assert r.status_code == 201, r.text
            e.setup_project(PROJECT, unit="core_hours", amount=100, cluster=CLUSTER)
            r = e.call("PUT", f"/v1/clusters/{CLUSTER}/accounts/alice", e.qm, json={"username": getpass.getuser()})
            assert r.status_code == 200, r.text
            yield e
    finally:
        CONTROLLER.shutdown()


def _tasks(env: BrokerEnv, job_id: str) -> dict[int, dict[str, Any]]:
    r = env.call("GET", f"/v1/jobs/{job_id}/tasks", env.auth("alice"))
    assert r.status_code == 200, r.text
    return {t["task"]: t for t in r.json()["items"]}


def _ledger_clean(env: BrokerEnv) -> None:
    with Session(env.engine) as session:
        assert ledger.check(session) == []


def test_array_on_pyslurm_tracked_charged_and_cancelled_per_task(env: BrokerEnv) -> None:
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": PROJECT, "cluster": CLUSTER, "script": "#!/bin/sh\n#SBATCH --array=0-2%2 -t 60\nsleep 300\n"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["array"]["tasks"] == 3 and job["reserved"]["amount"] == 3.0  # 3 tasks × 1 CPU × 1 h
    env.wait_job(job["id"], env.auth("alice"),
                 lambda j: (j["array"]["counts"] or {}) == {"RUNNING": 2, "PENDING": 1})
    tasks = _tasks(env, job["id"])
    assert tasks[2]["state"] == "PENDING" and tasks[2]["reason"] == "JobArrayTaskLimit", tasks
    sid = job["scheduler_job_id"] or env.job(job["id"], env.auth("alice"))["scheduler_job_id"]
    assert {t["scheduler_job_id"] for t in tasks.values()} == {f"{sid}_{n}" for n in range(3)}
    # a waiting task has no job number of its own in pyslurm: refused, nothing cancelled
    r = env.call("DELETE", f"/v1/jobs/{job['id']}/tasks/2", env.auth("alice"))
    assert (r.status_code, r.json()["code"]) == (422, "task_not_started"), r.text
    assert "whole array" in r.json()["detail"]
    # a running task is cancelled alone; its share is released, what it used charged
    assert env.call("DELETE", f"/v1/jobs/{job['id']}/tasks/1", env.auth("alice")).status_code == 202
    one = env.wait_job(job["id"], env.auth("alice"), lambda j: (j["array"]["counts"] or {}).get("CANCELLED") == 1)
    assert one["state"] == "RUNNING", one
    _ledger_clean(env)
    assert env.call("DELETE", f"/v1/jobs/{job['id']}", env.auth("alice")).status_code == 202
    done = env.wait_settled(job["id"], env.auth("alice"))
    assert done["state"] == "CANCELLED" and done["array"]["counts"] == {"CANCELLED": 3}, done
    assert done["reserved"]["amount"] == 0
    tasks = _tasks(env, job["id"])
    assert all(t["charged"] is not None for t in tasks.values())
    with env.engine.connect() as conn:
        kinds = [k for (k,) in conn.execute(sa.text(
            "SELECT kind FROM ledger_entries WHERE job_id = :j ORDER BY id"), {"j": job["id"]})]
    assert kinds.count("reserve") == 1 and kinds.count("release") == 3 and kinds.count("charge") == 3
    _ledger_clean(env)
