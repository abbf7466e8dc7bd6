"""GET /metrics parsed with prometheus-client's parser; the values match the API,
and every metric the alert rules and the Grafana dashboard use is exported."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.env import BrokerEnv
from tests.unit.test_observability import metric_names_used_by_observability


def _scrape(env: BrokerEnv) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    r = env.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        names = {family.name}
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
        for name in names:
            out.setdefault(name, {})
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_match_the_api(env: BrokerEnv) -> None:
    env.setup_project("EHPC-MET-001", amount=10.0, unit="core_hours")
    env.setup_project("EHPC-MET-002", amount=5.0, unit="node_hours", members=("bob",), account="proj-b")
    alice = env.auth("alice")
    job = env.call("POST", "/v1/jobs", alice, json={
        "project": "EHPC-MET-001", "script": "#!/bin/sh\nsleep 1\n", "time_limit_minutes": 5,
        "cpus_per_task": 2}).json()
    env.wait_settled(job["id"], alice)
    running = env.call("POST", "/v1/jobs", env.auth("bob"), json={
        "project": "EHPC-MET-002", "script": "#!/bin/sh\nsleep 30\n", "time_limit_minutes": 10}).json()
    env.wait_job(running["id"], env.auth("bob"), lambda j: j["state"] == "RUNNING")

    metrics = _scrape(env)
    usage = env.call("GET", "/v1/usage", env.qm).json()["allocations"]
    assert len(usage) == 2
    for row in usage:
        labels = (("cluster", row["cluster"]), ("project", row["project"]), ("unit", row["unit"]))
        for metric, key in (("granted", "granted"), ("used", "used"), ("reserved", "reserved"),
                            ("remaining", "remaining")):
            assert abs(metrics[f"aifa_allocation_{metric}"][labels] - row[key]) < 1e-9, (metric, row)
    assert metrics["aifa_allocation_reserved"][(("cluster", "local"), ("project", "EHPC-MET-002"),
                                                ("unit", "node_hours"))] > 0

    jobs = env.call("GET", "/v1/jobs", env.qm).json()
    items = jobs["items"] if isinstance(jobs, dict) else jobs
    by_state: dict[str, int] = {}
    for j in items:
        by_state[j["state"]] = by_state.get(j["state"], 0) + 1
    exported = {dict(k)["state"]: v for k, v in metrics["aifa_jobs"].items() if dict(k)["cluster"] == "local"}
    assert exported == by_state

    assert metrics["aifa_cluster_up"][(("cluster", "local"),)] == 1.0
    assert metrics["aifa_cluster_online"][(("cluster", "local"),)] == 1.0
    assert 0 <= metrics["aifa_tracker_lag_seconds"][(("cluster", "local"),)] < 30
    assert metrics["aifa_jobs_submitted_total"][(("cluster", "local"),)] >= 2
    assert any(dict(k).get("cluster") == "local" for k in metrics["aifa_tracker_cycle_seconds_count"])

    # bounded labels: no job ids or user names anywhere
    text = env.client.get("/metrics").text
    for forbidden in (job["id"], running["id"], "alice", "bob"):
        assert forbidden not in text

    missing = metric_names_used_by_observability() - set(metrics)
    assert not missing, f"alert rules / Grafana use metrics the broker does not export: {missing}"
    env.call("DELETE", f"/v1/jobs/{running['id']}", env.auth("bob"))
