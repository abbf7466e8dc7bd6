"""Table tests of the slurm_rest translation layers against recorded slurmrestd JSON.

Fixtures under tests/fixtures/slurm_rest/<release>/<version>/ are copies of the
samples in /work/shared/notes (22.05: also ``live_*`` answers recorded from the
dev cluster, as ``{"status": HTTP status, "body": ...}``). The OpenAPI documents
are trimmed to the paths and the submit schemas.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.slurm_rest import convert
from adapters.slurm_rest.discovery import job_description_fields
from adapters.slurm_rest.layers import LAYERS, ApiLayer
from adapters.slurm_rest.model import AccountingQuery, SubmitRequest
from broker.states import JobState

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "slurm_rest"

NEW_VERSIONS = [
    ("24.11", "v0.0.40"),
    ("24.11", "v0.0.41"),
    ("24.11", "v0.0.42"),
    ("26.05", "v0.0.42"),
    ("26.05", "v0.0.43"),
    ("26.05", "v0.0.44"),
    ("26.05", "v0.0.45"),
]
ALL_VERSIONS = [("22.05", "v0.0.38"), *NEW_VERSIONS]


def load(*parts: str) -> Any:
    return json.loads((FIXTURES.joinpath(*parts)).read_text())


def layer(version: str) -> ApiLayer:
    return LAYERS[version]()


REQUEST = SubmitRequest(
    script="#!/bin/sh\necho 'a;b' $HOME\n",
    name="train.aifa-" + "a" * 32,
    account="proj-a",
    comment="aifa-broker:" + "a" * 32,
    time_limit_minutes=7,
    working_directory="/home/alice",
    environment={"PATH": "/usr/bin:/bin", "X": "a=b, c"},
    partition="gpu",
    nodes=1,
    ntasks_per_node=2,
    cpus_per_task=3,
    gpus_per_node=2,
    memory_per_node_mb=1024,
)


# ---------------------------------------------------------------- submit bodies


@pytest.mark.parametrize(("release", "version"), ALL_VERSIONS)
def test_submit_body_fields_exist_in_served_schema(release: str, version: str) -> None:
    """Every job field the layer sends is in that version's served schema."""
    api = layer(version)
    body = api.submit_body(REQUEST)
    accepted = job_description_fields(load(release, "openapi_v3.json"), version)
    assert accepted is not None
    assert set(api.job_description(body)) <= accepted
    assert api.gpu_request_field in accepted


@pytest.mark.parametrize(
    ("version", "gpu_field", "gpu_value", "env", "time_limit", "memory"),
    [
        ("v0.0.38", "gres", "gpu:2", {"PATH": "/usr/bin:/bin", "X": "a=b, c"}, 7, 1024),
        *[
            (
                v,
                "tres_per_node",
                "gres/gpu:2",
                ["PATH=/usr/bin:/bin", "X=a=b, c"],
                {"set": True, "infinite": False, "number": 7},
                {"set": True, "infinite": False, "number": 1024},
            )
            for v in ("v0.0.40", "v0.0.41", "v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45")
        ],
    ],
)
def test_submit_body_shapes(
    version: str, gpu_field: str, gpu_value: str, env: Any, time_limit: Any, memory: Any
) -> None:
    api = layer(version)
    body = api.submit_body(REQUEST)
    job = api.job_description(body)
    assert job[gpu_field] == gpu_value
    assert job["environment"] == env
    assert job["time_limit"] == time_limit
    assert job["memory_per_node"] == memory
    assert job["name"] == REQUEST.name and job["comment"] == REQUEST.comment
    assert job["tasks"] == 2 and job["tasks_per_node"] == 2 and job["cpus_per_task"] == 3
    other = "tres_per_node" if gpu_field == "gres" else "gres"
    assert other not in job, "the field the version ignores must never be sent"
    script = body["script"] if version == "v0.0.38" else job["script"]
    assert script == REQUEST.script


@pytest.mark.parametrize(("release", "version"), NEW_VERSIONS)
def test_submit_body_matches_sample_shapes(release: str, version: str) -> None:
    """Fields shared with the recorded sample body have the same JSON types."""
    sample = load(release, version, "rest_submit_body.json")["job"]
    ours = layer(version).submit_body(REQUEST)["job"]
    for key in set(sample) & set(ours) - {"time_limit"}:
        assert type(ours[key]) is type(sample[key]), key


def test_submit_without_gpus_or_memory_leaves_them_out() -> None:
    plain = SubmitRequest(**{**REQUEST.__dict__, "gpus_per_node": 0, "memory_per_node_mb": None, "partition": None})
    for version in LAYERS:
        job = layer(version).job_description(layer(version).submit_body(plain))
        assert not {"gres", "tres_per_node", "memory_per_node", "partition"} & set(job)


@pytest.mark.parametrize(
    ("release", "version", "job_id"),
    [("22.05", "v0.0.38", "657")] + [(r, v, None) for r, v in NEW_VERSIONS],
)
def test_submitted_job_id(release: str, version: str, job_id: str | None) -> None:
    answer = load(release, version, "rest_submit_response.json")
    expected = job_id or str(answer["job_id"])
    assert layer(version).submitted_job_id(answer) == expected


def test_submitted_job_id_from_result_only() -> None:
    assert layer("v0.0.41").submitted_job_id({"result": {"job_id": 12}}) == "12"
    assert layer("v0.0.41").submitted_job_id({"job_id": 0}) is None


# ---------------------------------------------------------------- queue records


@pytest.mark.parametrize(("release", "version"), NEW_VERSIONS)
def test_queue_job_completed(release: str, version: str) -> None:
    item = load(release, version, "rest_job_get.json")["jobs"][0]
    job = layer(version).parse_queue_job(item)
    assert job.states == ("COMPLETED",)
    assert job.exit_code == 0
    assert job.user == "alice" and job.account == "proj-a" and job.partition == "gpu"
    assert job.alloc_tres == {"cpu": 1, "mem": 500, "node": 1, "billing": 1, "gres/gpu": 1}
    assert job.time_limit_minutes == 5
    assert job.submit_time == datetime.fromtimestamp(item["submit_time"]["number"], tz=UTC)
    assert job.end_time is not None and job.elapsed_seconds is not None
    assert job.stdout_path == f"/home/alice/rest-{item['job_id']}.out", "expanded path"
    assert not job.from_accounting
    assert convert.to_status(job, final=False).state is JobState.COMPLETED


@pytest.mark.parametrize(("release", "version"), NEW_VERSIONS)
def test_queue_job_pending(release: str, version: str) -> None:
    item = load(release, version, "rest_job_get_pending.json")["jobs"][0]
    job = layer(version).parse_queue_job(item)
    status = convert.to_status(job, final=False)
    assert status.state is JobState.PENDING
    assert status.exit_code is None and status.start_time is None and status.end_time is None
    assert status.reason == "JobHeldUser"
    assert job.alloc_tres == {}


def test_queue_job_2205_sample() -> None:
    item = load("22.05", "v0.0.38", "squeue_json_job657.json")["jobs"][0]
    job = layer("v0.0.38").parse_queue_job(item)
    assert (job.job_id, job.states, job.exit_code) == ("657", ("COMPLETED",), 0)
    assert job.alloc_tres["gres/gpu"] == 1 and job.comment == "extid:rest-777"
    assert job.elapsed_seconds == 2 and job.time_limit_minutes == 5


# Recorded from the dev clusters: role -> job id per (release, version).
LIVE_IDS = {
    ("22.05", "v0.0.38"): {"ok": "2", "fail": "3", "timeout": "4", "cancel": "5", "gpu": "6", "running": "24"},
    ("24.11", "v0.0.40"): {"ok": "2", "fail": "3", "timeout": "4", "cancel": "5", "gpu": "6", "running": "57"},
    ("24.11", "v0.0.42"): {"ok": "2", "fail": "3", "timeout": "4", "cancel": "5", "gpu": "6", "running": "57"},
    ("26.05", "v0.0.42"): {"ok": "1", "fail": "2", "timeout": "3", "running": "4", "gpu": "5"},
    ("26.05", "v0.0.45"): {"ok": "1", "fail": "2", "timeout": "3", "running": "4", "gpu": "5"},
}
# role: (state, queue exit code, accounting exit code per release, gpus)
LIVE_ROLES = {
    "ok": (JobState.COMPLETED, 0, {"22.05": 0, "24.11": 0, "26.05": 0}, None),
    "fail": (JobState.FAILED, 3, {"22.05": None, "24.11": 3, "26.05": 3}, None),
    # what Slurm reports for a job killed at its limit differs by release
    "timeout": (
        JobState.TIMEOUT,
        {"22.05": 143, "24.11": 143, "26.05": 0},
        {"22.05": None, "24.11": 0, "26.05": 0},
        None,
    ),
    "cancel": (JobState.CANCELLED, 143, {"22.05": None, "24.11": 0}, None),
    "gpu": (JobState.COMPLETED, 0, {"22.05": 0, "24.11": 0, "26.05": 0}, 1.0),
    "running": (JobState.RUNNING, None, {}, None),
}
LIVE_CASES = [(rel, ver, role) for (rel, ver), roles in sorted(LIVE_IDS.items()) for role in sorted(roles)]


@pytest.mark.parametrize(("release", "version", "role"), LIVE_CASES)
def test_live_queue_and_accounting(release: str, version: str, role: str) -> None:
    state, queue_exit, db_exits, gpus = LIVE_ROLES[role]
    job_id = LIVE_IDS[(release, version)][role]
    api = layer(version)
    queue = {j.job_id: j for j in map(api.parse_queue_job, load(release, version, "live_jobs.json")["body"]["jobs"])}
    db = {
        j.job_id: j
        for j in map(api.parse_accounting_job, load(release, version, "live_slurmdb_jobs.json")["body"]["jobs"])
    }
    assert convert.to_status(queue[job_id], final=False).state is state
    assert queue[job_id].exit_code == (queue_exit[release] if isinstance(queue_exit, dict) else queue_exit)
    assert (queue[job_id].end_time is None) is (state is JobState.RUNNING), "expected end is not an end"
    if role != "running":
        assert db[job_id].exit_code == db_exits[release]
    assert convert.settled(db[job_id]) is (state is not JobState.RUNNING)
    assert db[job_id].alloc_tres.get("gres/gpu") == gpus
    assert queue[job_id].alloc_tres.get("gres/gpu") == gpus
    assert convert.job_tag(db[job_id]) is not None, "tag read from the name, no comment needed"
    assert not db[job_id].comment, "the dev clusters do not store comments in accounting"
    assert (db[job_id].sluid is not None) is (version == "v0.0.45")
    if version in ("v0.0.43", "v0.0.44", "v0.0.45"):
        assert queue[job_id].stdout_path and "%" not in queue[job_id].stdout_path


def api_failures(version: str, body: dict[str, Any]) -> list[Any]:
    return list(layer(version).cancel_failures(body))


@pytest.mark.parametrize(("release", "version"), sorted(LIVE_IDS))
def test_live_errors_and_controller(release: str, version: str) -> None:
    from adapters.slurm_rest.errors import classify, errors_in

    def first_error(name: str) -> str:
        return classify(errors_in(load(release, version, f"live_{name}.json")["body"])[0]).code

    assert first_error("submit_bad_account") == "invalid_account"
    assert first_error("submit_bad_partition") == "invalid_partition"
    assert first_error("delete_unknown") == "job_not_found"
    if version not in ("v0.0.38", "v0.0.40", "v0.0.41"):  # 200 answers, failures in status[]
        for name, code in (
            ("delete_permission_denied", "permission_denied"),
            ("delete_already_done", "job_already_done"),
        ):
            failures = errors_in({"errors": api_failures(version, load(release, version, f"live_{name}.json")["body"])})
            assert classify(failures[0]).code == code
    api = layer(version)
    (ping,) = [api.parse_ping(p) for p in load(release, version, "live_ping.json")["body"]["pings"]]
    assert ping.up
    nodes = [api.parse_node(n) for n in load(release, version, "live_nodes.json")["body"]["nodes"]]
    assert nodes[0].gpus == 4 and set(nodes[0].partitions) == {"cpu", "gpu"}
    parts = {
        p.name: p
        for p in map(api.parse_partition, load(release, version, "live_partitions.json")["body"]["partitions"])
    }
    assert parts["cpu"].tres["cpu"] > 0 and parts["gpu"].tres["gres/gpu"] == 4
    assert parts["cpu"].max_time_minutes is None and parts["cpu"].up
    assert parts["cpu"].default is (version in ("v0.0.38", "v0.0.45")), "v0.0.40-44 have no default flag"


# ---------------------------------------------------------------- accounting records


@pytest.mark.parametrize(("release", "version"), NEW_VERSIONS)
def test_accounting_job(release: str, version: str) -> None:
    item = load(release, version, "rest_slurmdb_job.json")["jobs"][0]
    job = layer(version).parse_accounting_job(item)
    assert job.states == ("COMPLETED",) and job.exit_code == 0
    assert job.alloc_tres == {"cpu": 1, "mem": 500, "node": 1, "billing": 1, "gres/gpu": 1}
    assert job.elapsed_seconds == item["time"]["elapsed"]
    assert job.time_limit_minutes == 5 and job.comment == "extid:rest-1"
    assert convert.settled(job)
    record = convert.to_usage(job)
    assert record is not None and record.account == "proj-a" and record.username == "alice"
    assert job.sluid == (item.get("sluid") if version == "v0.0.45" else None)
    if version == "v0.0.45":
        assert job.sluid == "s1WXM8BR10AN00"


def test_accounting_job_2205_sample() -> None:
    item = load("22.05", "v0.0.38", "rest_slurmdb_job657.json")["jobs"][0]
    job = layer("v0.0.38").parse_accounting_job(item)
    assert job.states == ("COMPLETED",) and job.exit_code == 0
    assert job.alloc_tres == {"cpu": 1, "mem": 500, "node": 1, "billing": 1, "gres/gpu": 1}
    assert job.comment == "extid:rest-777" and convert.settled(job)


@pytest.mark.parametrize(
    ("name", "limit", "states", "end", "settled"),
    [
        ("train.aifa-" + "b" * 32, 10, ["COMPLETED"], 100, True),
        ("allocation", 0, ["COMPLETED"], 100, False),  # slurmdbd's placeholder
        ("train", 10, ["RUNNING"], 0, False),
        ("train", 10, ["FAILED"], 0, False),  # no end time yet
        ("allocation", 10, ["COMPLETED"], 100, True),  # a job really named so
    ],
)
def test_settled(name: str, limit: int, states: list[str], end: int, settled: bool) -> None:
    item = {
        "job_id": 9,
        "name": name,
        "state": {"current": states, "reason": "None"},
        "time": {
            "elapsed": 1,
            "submission": 90,
            "start": 99,
            "end": end,
            "limit": {"set": True, "infinite": False, "number": limit},
        },
    }
    assert convert.settled(layer("v0.0.40").parse_accounting_job(item)) is settled


# ---------------------------------------------------------------- accounting query


@pytest.mark.parametrize(("version", "has_users"), [("v0.0.38", False), ("v0.0.40", True), ("v0.0.45", True)])
def test_accounting_params(version: str, has_users: bool) -> None:
    """Relative start times: 22.05 and v0.0.40/41 reject bare UNIX timestamps (live-checked)."""
    query = AccountingQuery(lookback_seconds=3600, accounts=["proj-a", "proj-b"], users=["alice"])
    params = layer(version).accounting_params(query)
    assert params["start_time"] == "now-3600seconds"
    assert params["account"] == "proj-a,proj-b"
    assert params["skip_steps"] == "true"
    assert ("users" in params) is has_users


@pytest.mark.parametrize(
    ("version", "until", "states", "end_time", "state"),
    [
        # poll/find_by_tag: no end, no states (jobs eligible or running since the start)
        ("v0.0.38", None, (), None, None),
        ("v0.0.45", None, (), None, None),
        # usage up to now: end states need an explicit end (without one slurmdbd finds nothing)
        ("v0.0.38", None, ("CANCELLED", "COMPLETED"), "now", "CANCELLED,COMPLETED"),
        ("v0.0.40", None, ("CANCELLED", "COMPLETED"), "now", ["CANCELLED", "COMPLETED"]),
        ("v0.0.40", 0, ("CANCELLED",), "now", ["CANCELLED"]),
        # usage of a bounded window: 22.05 takes one comma list, v0.0.40+ the parameter repeated
        ("v0.0.38", 600, ("CANCELLED", "COMPLETED"), "now-600seconds", "CANCELLED,COMPLETED"),
        ("v0.0.41", 600, ("CANCELLED", "COMPLETED"), "now-600seconds", ["CANCELLED", "COMPLETED"]),
        ("v0.0.45", 86400, ("TIMEOUT",), "now-86400seconds", ["TIMEOUT"]),
        ("v0.0.45", 600, (), "now-600seconds", None),
    ],
)
def test_accounting_params_window_end_and_states(
    version: str, until: int | None, states: tuple[str, ...], end_time: str | None, state: object
) -> None:
    """Live-checked on 22.05 (v0.0.38), 24.11 (v0.0.40-42), 26.05 (v0.0.42-45): a comma
    list is "Unknown flag" (9207) on v0.0.40+, a repeated ``state`` finds nothing on v0.0.38."""
    query = AccountingQuery(lookback_seconds=7200, accounts=["proj-a"], until_seconds=until, states=states)
    params = layer(version).accounting_params(query)
    assert params["start_time"] == "now-7200seconds"
    assert params.get("end_time") == end_time
    assert params.get("state") == state


@pytest.mark.parametrize(
    ("version", "jobs", "db_jobs"),
    [
        ("v0.0.38", "/slurm/v0.0.38/jobs", "/slurmdb/v0.0.38/jobs"),
        ("v0.0.40", "/slurm/v0.0.40/jobs/", "/slurmdb/v0.0.40/jobs/"),
        ("v0.0.45", "/slurm/v0.0.45/jobs/", "/slurmdb/v0.0.45/jobs/"),
    ],
)
def test_paths(version: str, jobs: str, db_jobs: str) -> None:
    api = layer(version)
    assert (api.jobs_path, api.db_jobs_path) == (jobs, db_jobs)
    assert api.job_path("5") == f"/slurm/{version}/job/5"


@pytest.mark.parametrize(("release", "version"), ALL_VERSIONS)
def test_every_path_is_served(release: str, version: str) -> None:
    api = layer(version)
    served = set(load(release, "openapi_v3.json")["paths"])
    for path in (
        api.submit_path,
        api.jobs_path,
        api.job_path("{job_id}"),
        api.db_jobs_path,
        api.ping_path,
        api.db_health_path,
        api.partitions_path,
        api.nodes_path,
    ):
        assert path in served, path


# ---------------------------------------------------------------- controller objects


@pytest.mark.parametrize(
    ("version", "item", "up"),
    [
        ("v0.0.38", {"hostname": "vm", "ping": "UP", "status": 0, "mode": "primary"}, True),
        ("v0.0.38", {"hostname": "vm", "ping": "DOWN"}, False),
        ("v0.0.40", {"hostname": "vm", "pinged": "UP", "latency": 120, "mode": "primary"}, True),
        ("v0.0.41", {"hostname": "vm", "pinged": "DOWN", "latency": 0}, False),
        ("v0.0.42", {"hostname": "vm", "pinged": "UP", "responding": True, "primary": True}, True),
        ("v0.0.44", {"hostname": "vm", "pinged": "UP", "responding": False, "primary": True}, False),
        ("v0.0.45", {"hostname": "vm", "responding": True, "primary": True, "status": "OK"}, True),
        ("v0.0.45", {"hostname": "vm", "responding": False, "primary": True}, False),
    ],
)
def test_ping(version: str, item: dict[str, Any], up: bool) -> None:
    assert layer(version).parse_ping(item).up is up


NEW_PARTITION = {
    "name": "gpu",
    "nodes": {"total": 2, "configured": "n[1-2]"},
    "cpus": {"total": 16},
    "maximums": {"time": {"set": True, "infinite": False, "number": 120}},
    "tres": {"configured": "cpu=16,mem=32000M,node=2,billing=16,gres/gpu=8"},
    "partition": {"state": ["UP"]},
    "flags": ["DEFAULT"],
}


@pytest.mark.parametrize(("version", "default"), [("v0.0.40", False), ("v0.0.44", False), ("v0.0.45", True)])
def test_new_partition(version: str, default: bool) -> None:
    record = layer(version).parse_partition(NEW_PARTITION)
    assert (record.name, record.total_nodes, record.total_cpus) == ("gpu", 2, 16)
    assert record.max_time_minutes == 120 and record.tres["gres/gpu"] == 8
    assert record.default is default and record.up


def test_new_partition_unlimited_time() -> None:
    item = {**NEW_PARTITION, "maximums": {"time": {"set": True, "infinite": True, "number": 0}}}
    assert layer("v0.0.42").parse_partition(item).max_time_minutes is None


def test_new_node() -> None:
    node = layer("v0.0.42").parse_node(
        {"name": "n1", "cpus": 8, "real_memory": 16000, "gres": "gpu:a100:4(S:0-1)", "partitions": ["cpu", "gpu"]}
    )
    assert (node.cpus, node.real_memory_mb, node.gpus, node.partitions) == (8, 16000, 4, ("cpu", "gpu"))
