"""Placement through the API on two local clusters (issue 12 point 1), SQLite and
PostgreSQL: the budget decides when both start at once, draining and unreachable
clusters are skipped, an eligibility plugin vetoes a candidate, one refusal lists
every candidate's reason, partition classes map per cluster and are validated.
The Slurm version (expected start from ``sbatch --test-only``) is
tests/integration/test_placement_slurm.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from adapters.local import LocalAdapter
from broker import plugins
from broker.adapter import ClusterUnreachable, JobSpec, StartEstimate
from broker.cli import app
from broker.config import DEFAULT_ELIGIBILITY_CHAIN
from broker.policy import Denial, EligibilityContext
from tests.support.env import LOCAL_TEST_CONNECTION, BrokerEnv, broker_env
from tests.support.server import live_server

P = "EHPC-PLACE-001"
GPU_JOB = {"project": P, "cluster": "auto", "script": "#!/bin/sh\n#SBATCH --partition=accel\nsleep 60\n",
           "time_limit_minutes": 60, "gpus_per_node": 1}


class DataResidency:
    """Test policy: a project with ``attributes.residency`` runs only on clusters
    whose name starts with it (a site would look at the cluster's country)."""

    name = "test_data_residency"

    def check(self, ctx: EligibilityContext) -> Denial | None:
        where = ctx.project.attributes.get("residency")
        if where and not ctx.request.cluster.startswith(str(where)):
            return Denial("data_residency", f"Project data must stay on {where}* clusters.")
        return None


@pytest.fixture
def two(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    yield from _two(db_url, tmp_path, run_tracker=True)


@pytest.fixture
def two_untracked(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    """No tracker: its probes would close a circuit breaker the test opened."""
    yield from _two(db_url, tmp_path, run_tracker=False)


def _two(db_url: str, tmp_path: Path, *, run_tracker: bool) -> Iterator[BrokerEnv]:
    plugins.register(plugins.POLICY_GROUP, "test_data_residency", DataResidency)
    chain = [*DEFAULT_ELIGIBILITY_CHAIN, "test_data_residency"]
    with broker_env(tmp_path, db_url, run_tracker=run_tracker, eligibility_chain=chain,
                    placement_probe_seconds=5) as env:
        r = env.call("POST", "/v1/clusters", env.qm, json={
            "name": "local-b", "adapter": "local", "connection": LOCAL_TEST_CONNECTION,
            "partition_classes": {"accel": "gpu"}})
        assert r.status_code == 201, r.text
        r = env.call("PATCH", "/v1/clusters/local", env.qm, json={"partition_classes": {"accel": "gpu"}})
        assert r.status_code == 200, r.text
        env.setup_project(P, amount=10, unit="gpu_hours", cluster="local")
        r = env.call("POST", f"/v1/projects/{P}/allocations", env.qm, json={
            "cluster": "local-b", "unit": "gpu_hours", "amount": 3, "account": "proj-a"})
        assert r.status_code == 201, r.text
        r = env.call("PUT", "/v1/clusters/local-b/accounts/alice", env.qm, json={"username": "alice"})
        assert r.status_code == 200, r.text
        yield env


def _by_cluster(placement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["cluster"]: c for c in placement["candidates"]}


def _remaining(env: BrokerEnv, cluster: str) -> float:
    with env.engine.connect() as conn:
        return float(conn.execute(sa.text(
            "SELECT a.granted - a.charged - a.reserved FROM allocations a JOIN clusters c ON c.id = a.cluster_id "
            "JOIN projects p ON p.id = a.project_id WHERE c.name = :c AND p.code = :p"),
            {"c": cluster, "p": P}).scalar_one()) / 1e6


def test_same_start_lowest_budget_share_wins_and_only_it_is_reserved(two: BrokerEnv) -> None:
    alice = two.auth("alice")
    est = two.call("POST", "/v1/jobs/estimate", alice, json=GPU_JOB)
    assert est.status_code == 200, est.text
    body = est.json()
    assert body["allowed"] and body["cluster"] == "local"  # 1 of 10 GPU hours beats 1 of 3
    cands = _by_cluster(body["placement"])
    assert cands["local"]["partition"] == cands["local-b"]["partition"] == "gpu"  # class accel → gpu
    assert cands["local"]["start_method"] == cands["local-b"]["start_method"] == "immediate"
    assert cands["local"]["budget_share"] == pytest.approx(0.1)
    assert cands["local-b"]["budget_share"] == pytest.approx(1 / 3)
    before_b = _remaining(two, "local-b")
    r = two.call("POST", "/v1/jobs", alice, json=GPU_JOB)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["cluster"] == "local" and job["partition"] == "gpu"
    assert job["placement"]["chosen"] == "local" and job["placement"]["policy"] == "earliest_start"
    assert "budget share 10.0%" in job["placement"]["reason"]
    assert set(_by_cluster(job["placement"])) == {"local", "local-b"}
    assert _remaining(two, "local") == pytest.approx(9) and _remaining(two, "local-b") == before_b
    assert two.job(job["id"], alice)["placement"] == job["placement"]  # kept on the job
    two.call("POST", f"/v1/jobs/{job['id']}/cancel", alice)


def test_budget_exhausted_on_one_lands_on_the_other(two: BrokerEnv) -> None:
    alice = two.auth("alice")
    big = {**GPU_JOB, "time_limit_minutes": 5 * 60}  # 5 GPU hours: only local (10) can pay
    r = two.call("POST", "/v1/jobs", alice, json=big)
    assert r.status_code == 201, r.text
    assert r.json()["cluster"] == "local"
    r2 = two.call("POST", "/v1/jobs", alice, json={**GPU_JOB, "time_limit_minutes": 150})
    # local now has 5 left (2.5 = 50 %), local-b 3 (2.5 = 83 %): local; then local has 2.5 left
    assert r2.status_code == 201 and r2.json()["cluster"] == "local", r2.text
    r3 = two.call("POST", "/v1/jobs", alice, json={**GPU_JOB, "time_limit_minutes": 170})
    assert r3.status_code == 201, r3.text
    assert r3.json()["cluster"] == "local-b"
    why = _by_cluster(r3.json()["placement"])
    assert [d["code"] for d in why["local"]["denials"]] == ["quota_exceeded"]
    for job in (r, r2, r3):
        two.call("POST", f"/v1/jobs/{job.json()['id']}/cancel", alice)


def test_both_impossible_one_refusal_listing_each_candidate(two: BrokerEnv) -> None:
    alice = two.auth("alice")
    r = two.call("POST", "/v1/jobs", alice, json={**GPU_JOB, "time_limit_minutes": 11 * 60})
    assert r.status_code == 403, r.text
    problem = r.json()
    assert problem["code"] == "no_eligible_cluster"
    reasons = {c["cluster"]: [d["code"] for d in c["denials"]] for c in problem["candidates"]}
    assert reasons == {"local": ["quota_exceeded"], "local-b": ["quota_exceeded"]}
    assert "local: quota_exceeded" in problem["detail"] and "local-b: quota_exceeded" in problem["detail"]
    est = two.call("POST", "/v1/jobs/estimate", alice, json={**GPU_JOB, "time_limit_minutes": 11 * 60}).json()
    assert not est["allowed"] and est["placement"]["chosen"] is None
    assert {d["detail"].split(":")[0] for d in est["denials"]} == {"local", "local-b"}
    with two.engine.connect() as conn:  # nothing reserved anywhere
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one() == 0


@pytest.mark.parametrize("state", ["draining", "offline"])
def test_draining_and_down_clusters_are_skipped_not_waited_on(two: BrokerEnv, state: str) -> None:
    alice = two.auth("alice")
    r = two.call("PATCH", "/v1/clusters/local", two.qm, json={"state": state})
    assert r.status_code == 200, r.text
    r = two.call("POST", "/v1/jobs", alice, json=GPU_JOB)
    assert r.status_code == 201, r.text
    assert r.json()["cluster"] == "local-b"
    assert [d["code"] for d in _by_cluster(r.json()["placement"])["local"]["denials"]] == [f"cluster_{state}"]
    two.call("POST", f"/v1/jobs/{r.json()['id']}/cancel", alice)


def test_a_cluster_behind_an_open_circuit_breaker_is_skipped(two_untracked: BrokerEnv) -> None:
    env = two_untracked
    now = datetime.now(tz=UTC).replace(tzinfo=None)
    with env.engine.begin() as conn:  # a submission could not connect to local a moment ago
        conn.execute(sa.text("UPDATE clusters SET health_ok = false, unreachable_since = :t, "
                             "health_checked_at = :t, health_detail = 'connection refused' WHERE name = 'local'"),
                     {"t": now})
    r = env.call("POST", "/v1/jobs/estimate", env.auth("alice"), json=GPU_JOB)
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["cluster"] == "local-b"
    local = _by_cluster(est["placement"])["local"]
    assert [d["code"] for d in local["denials"]] == ["cluster_unreachable"] and local["start_method"] is None


def test_an_eligibility_plugin_vetoes_a_candidate(two: BrokerEnv) -> None:
    r = two.call("PATCH", f"/v1/projects/{P}", two.qm, json={"attributes": {"residency": "local-b"}})
    assert r.status_code == 200, r.text
    est = two.call("POST", "/v1/jobs/estimate", two.auth("alice"), json=GPU_JOB).json()
    assert est["cluster"] == "local-b"  # would be local by budget share, but the data must stay
    assert [d["code"] for d in _by_cluster(est["placement"])["local"]["denials"]] == ["data_residency"]


def test_partition_classes_are_validated_and_auto_is_reserved(two: BrokerEnv) -> None:
    r = two.call("PATCH", "/v1/clusters/local-b", two.qm, json={"partition_classes": {"accel": "boost_usr_prod"}})
    assert r.status_code == 422 and r.json()["code"] == "cluster_misconfigured", r.text
    assert "boost_usr_prod" in r.json()["detail"]
    r = two.call("PATCH", "/v1/clusters/local-b", two.qm, json={"partition_classes": {"bad name!": "gpu"}})
    assert r.status_code == 422, r.text
    r = two.call("POST", "/v1/clusters", two.qm, json={"name": "auto", "adapter": "local",
                                                       "connection": LOCAL_TEST_CONNECTION})
    assert r.status_code == 422 and "reserved" in r.text, r.text
    assert two.call("GET", "/v1/clusters/local-b", two.qm).json()["partition_classes"] == {"accel": "gpu"}
    # a class no cluster has: each candidate says so
    r = two.call("POST", "/v1/jobs", two.auth("alice"), json={**GPU_JOB, "script": "#!/bin/sh\ntrue\n",
                                                              "partition": "nosuch"})
    assert r.status_code == 403, r.text
    assert {c["denials"][0]["code"] for c in r.json()["candidates"]} == {"no_partition"}


def test_cli_cluster_auto_estimate_submit_and_refusal(two: BrokerEnv, tmp_path: Path) -> None:
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/sh\n#SBATCH --partition=accel\nsleep 30\n")
    runner = CliRunner()
    with live_server(two.app) as base:
        common = {"AIFA_BROKER_URL": base, "AIFA_BROKER_TOKEN": two.token("alice")}
        args = [str(script), "-p", P, "-t", "60", "--gpus", "1", "--cluster", "auto"]
        est = runner.invoke(app, ["job", "estimate", *args], env=common)
        assert est.exit_code == 0, est.output
        verdict = json.loads(est.output)
        assert verdict["cluster"] == "local" and len(verdict["placement"]["candidates"]) == 2
        sub = runner.invoke(app, ["job", "submit", *args], env=common)
        assert sub.exit_code == 0, sub.output
        assert " on local/gpu " in sub.output and "placed: local (gpu) by earliest_start" in sub.output
        job_id = sub.output.split()[0]
        assert runner.invoke(app, ["job", "cancel", job_id], env=common).exit_code == 0
        big = [str(script), "-p", P, "-t", str(11 * 60), "--gpus", "1", "--cluster", "auto"]
        refused = runner.invoke(app, ["job", "submit", *big], env=common)
        assert refused.exit_code == 1 and "[no_eligible_cluster]" in refused.output
        assert "  local: quota_exceeded:" in refused.output and "  local-b: quota_exceeded:" in refused.output


def test_auto_submission_is_idempotent_and_arrays_are_placed_like_elsewhere(two: BrokerEnv) -> None:
    alice = {**two.auth("alice"), "Idempotency-Key": "place-once-1"}
    first = two.call("POST", "/v1/jobs", alice, json=GPU_JOB)
    again = two.call("POST", "/v1/jobs", alice, json=GPU_JOB)
    assert first.status_code == 201 and again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers.get("Idempotent-Replayed") == "true"
    with two.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one() == 1
    two.call("POST", f"/v1/jobs/{first.json()['id']}/cancel", two.auth("alice"))
    array = {**GPU_JOB, "script": "#!/bin/sh\n#SBATCH --partition=accel\n#SBATCH --array=0-3\nsleep 1\n"}
    est = two.call("POST", "/v1/jobs/estimate", two.auth("alice"), json=array).json()
    assert est["allowed"], est
    r = two.call("POST", "/v1/jobs", two.auth("alice"), json=array)
    assert r.status_code == 201, r.text
    assert r.json()["array"]["tasks"] == 4 and r.json()["cluster"] == est["cluster"]
    assert r.json()["estimated_cost"] == est["estimated_cost"]


class _UnreachableLocal(LocalAdapter):
    """A local cluster whose scheduler cannot be reached when asked for a start."""

    def expected_start(self, spec: JobSpec) -> StartEstimate:
        raise ClusterUnreachable("cannot connect to login.example: connection refused")


def test_a_cluster_that_cannot_be_reached_while_probing_is_denied_and_its_breaker_opens(
        two_untracked: BrokerEnv) -> None:
    env = two_untracked
    plugins.register(plugins.ADAPTER_GROUP, "test_unreachable_local", _UnreachableLocal)
    r = env.call("POST", "/v1/clusters", env.qm, json={
        "name": "local-c", "adapter": "test_unreachable_local", "connection": LOCAL_TEST_CONNECTION,
        "partition_classes": {"accel": "gpu"}})
    assert r.status_code == 201, r.text
    r = env.call("POST", f"/v1/projects/{P}/allocations", env.qm, json={
        "cluster": "local-c", "unit": "gpu_hours", "amount": 1000, "account": "proj-a"})
    assert r.status_code == 201, r.text
    assert env.call("PUT", "/v1/clusters/local-c/accounts/alice", env.qm,
                    json={"username": "alice"}).status_code == 200
    est = env.call("POST", "/v1/jobs/estimate", env.auth("alice"), json=GPU_JOB).json()
    assert est["cluster"] == "local"  # local-c has the most budget left, but does not answer
    assert [d["code"] for d in _by_cluster(est["placement"])["local-c"]["denials"]] == ["cluster_unreachable"]
    # its breaker is open now: a job named for it fails fast, nothing reserved
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json={**GPU_JOB, "cluster": "local-c", "partition": "gpu"})
    assert r.status_code == 503 and r.json()["code"] == "cluster_unavailable", r.text
    assert "placement probe" in r.json()["detail"]


def test_candidates_need_a_valid_allocation_and_a_cluster_account(two: BrokerEnv) -> None:
    alice = two.auth("alice")
    r = two.call("DELETE", "/v1/clusters/local/accounts/alice", two.qm)
    assert r.status_code in (200, 204), r.text
    est = two.call("POST", "/v1/jobs/estimate", alice, json=GPU_JOB).json()
    assert est["cluster"] == "local-b"
    assert "no_cluster_account" in [d["code"] for d in _by_cluster(est["placement"])["local"]["denials"]]
    assert two.call("PUT", "/v1/clusters/local/accounts/alice", two.qm,
                    json={"username": "alice"}).status_code == 200
    alloc_b = next(a for a in two.call("GET", f"/v1/projects/{P}", two.qm).json()["allocations"]
                   if a["cluster"] == "local-b")
    r = two.call("PATCH", f"/v1/projects/{P}/allocations/{alloc_b['id']}", two.qm,
                 json={"start_date": "2020-01-01", "end_date": "2020-12-31", "reason": "test: expired"})
    assert r.status_code == 200, r.text
    est = two.call("POST", "/v1/jobs/estimate", alice, json={**GPU_JOB, "time_limit_minutes": 60}).json()
    b = _by_cluster(est["placement"])["local-b"]
    assert not b["eligible"] and b["denials"][0]["code"] == "allocation_expired", b
