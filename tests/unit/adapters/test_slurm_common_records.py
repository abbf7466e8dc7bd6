"""Shared Slurm record readers: field shapes, sacct/squeue records of 22.05/24.11/26.05."""

from __future__ import annotations

import json
import pathlib
from datetime import UTC, datetime, timedelta

import pytest

from adapters.slurm_common.accounting import (
    MalformedRecord,
    accounting_job_from_json,
    accounting_job_from_parsable,
    tag_from_comment,
)
from adapters.slurm_common.queue import queue_job_from_json
from adapters.slurm_common.shapes import as_int, epoch_to_datetime, exit_code, state_words
from broker.states import JobState

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "slurm"
TAG = "0123456789abcdef0123456789abcdef"


def _jobs(release: str, name: str) -> list[dict]:
    return json.loads((FIXTURES / release / name).read_text())["jobs"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        ("7", 7),
        ({"set": True, "infinite": False, "number": 3}, 3),
        ({"set": False, "infinite": False, "number": 0}, None),
        ({"set": True, "infinite": True, "number": 0}, None),
        (None, None),
        (True, None),
        ("x", None),
        (2.9, 2),
    ],
)
def test_as_int(value, expected):
    assert as_int(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        ("0:0", 0),
        ("2:0", 2),
        ("0:15", 143),
        ({"status": "SUCCESS", "return_code": 0}, 0),
        ({"status": "FAILED", "return_code": 3}, 3),
        ({"status": "SIGNALED", "signal": {"signal_id": 9, "name": "KILL"}}, 137),
        (
            {
                "status": ["FAILED"],
                "return_code": {"set": True, "infinite": False, "number": 1},
                "signal": {"id": {"set": False, "infinite": False, "number": 0}, "name": ""},
            },
            1,
        ),
        (
            {
                "status": ["SIGNALED"],
                "return_code": {"set": True, "infinite": False, "number": 0},
                "signal": {"id": {"set": True, "infinite": False, "number": 15}, "name": "TERM"},
            },
            143,
        ),
        (None, None),
    ],
)
def test_exit_code_shapes(value, expected):
    assert exit_code(value) == expected


def test_state_words_and_epoch():
    assert state_words("RUNNING") == ["RUNNING"]
    assert state_words(["RUNNING", "COMPLETING"]) == ["RUNNING", "COMPLETING"]
    assert state_words({"current": ["COMPLETED"], "reason": "None"}) == ["COMPLETED"]
    assert state_words("") == []
    assert epoch_to_datetime(0) is None
    assert epoch_to_datetime({"set": True, "number": 1795690600}) == datetime.fromtimestamp(
        1795690600, tz=UTC
    )


@pytest.mark.parametrize(
    ("release", "name", "job_id", "gpus", "limit"),
    [
        ("22.05", "sacct_json_job657.json", "657", 1.0, 5),
        ("24.11", "sacct_json_one_job.json", "29", 1.0, 1),
        ("26.05", "sacct_json_one_job.json", "4", 1.0, 1),
    ],
)
def test_sacct_json_records_of_each_release(release, name, job_id, gpus, limit):
    (raw,) = _jobs(release, name)
    job = accounting_job_from_json(raw)
    assert job.job_id == job_id
    assert job.state is JobState.COMPLETED and job.raw_state == "COMPLETED"
    assert job.exit_code == 0
    assert job.account == "proj-a" and job.user == "alice" and job.partition == "gpu"
    assert job.alloc_tres["gres/gpu"] == gpus
    assert job.alloc_tres["cpu"] == 1.0 and job.alloc_tres["mem"] == 500.0
    assert job.alloc_tres["node"] == 1.0 and job.alloc_tres["billing"] == 1.0
    assert "energy" not in job.alloc_tres
    assert job.time_limit_minutes == limit
    assert job.submit_time is not None and job.end_time is not None
    assert job.elapsed_seconds is not None
    assert job.terminal and not job.placeholder
    later = job.end_time + timedelta(seconds=10)
    assert job.is_settled(later)
    assert not job.is_settled(later, lag_seconds=60)
    record = job.to_usage_record()
    assert record.job_id == job_id and record.alloc_tres["gres/gpu"] == gpus


def test_placeholder_record_is_not_settled():
    (raw,) = _jobs("22.05", "sacct_json_job657.json")
    raw = json.loads(json.dumps(raw))
    raw["name"] = "allocation"
    raw["time"]["limit"] = 0
    job = accounting_job_from_json(raw)
    assert job.placeholder
    assert not job.is_settled(datetime.now(tz=UTC))


def test_running_record_is_not_settled():
    (raw,) = _jobs("24.11", "sacct_json_one_job.json")
    raw = json.loads(json.dumps(raw))
    raw["state"]["current"] = ["RUNNING"]
    job = accounting_job_from_json(raw)
    assert job.state is JobState.RUNNING and not job.is_settled(datetime.now(tz=UTC))


@pytest.mark.parametrize("bad", [{}, {"job_id": 0}, {"job_id": "x"}, [], "job"])
def test_malformed_accounting_records_raise(bad):
    with pytest.raises(MalformedRecord):
        accounting_job_from_json(bad)


def test_tag_from_name_and_comment():
    (raw,) = _jobs("22.05", "sacct_json_job657.json")
    raw = json.loads(json.dumps(raw))
    raw["name"] = f"train.aifa-{TAG}"
    assert accounting_job_from_json(raw).tag == TAG
    raw["name"] = "plain"
    raw["comment"]["job"] = f"aifa-broker:{TAG}"
    assert accounting_job_from_json(raw).tag == TAG
    assert tag_from_comment("something else") is None


def test_parsable_row():
    row = {
        "JobIDRaw": "42",
        "User": "bob",
        "Account": "proj-b",
        "Partition": "cpu",
        "State": "CANCELLED by 1002",
        "Submit": "1795690600",
        "Start": "1795690601",
        "End": "1795690661",
        "ElapsedRaw": "60",
        "TimelimitRaw": "5",
        "AllocTRES": "billing=2,cpu=2,mem=1G,node=1",
        "ExitCode": "0:15",
        "JobName": f"a|b.aifa-{TAG}",
    }
    job = accounting_job_from_parsable(row)
    assert job.state is JobState.CANCELLED and job.raw_state == "CANCELLED"
    assert job.alloc_tres == {"billing": 2.0, "cpu": 2.0, "mem": 1024.0, "node": 1.0}
    assert job.exit_code == 143 and job.elapsed_seconds == 60 and job.tag == TAG
    assert job.start_time == datetime.fromtimestamp(1795690601, tz=UTC)
    unstarted = accounting_job_from_parsable({**row, "Start": "Unknown", "End": "Unknown"})
    assert unstarted.start_time is None and unstarted.end_time is None
    with pytest.raises(MalformedRecord):
        accounting_job_from_parsable({**row, "JobIDRaw": "42.batch"})


@pytest.mark.parametrize(
    ("release", "name"),
    [
        ("22.05", "squeue_json_job657.json"),
        ("24.11", "squeue_all.json"),
        ("26.05", "squeue_all.json"),
    ],
)
def test_squeue_records_of_each_release(release, name):
    jobs = [queue_job_from_json(raw) for raw in _jobs(release, name)]
    assert jobs
    for job in jobs:
        assert job.job_id.isdigit()
        assert job.state in {JobState.PENDING, JobState.RUNNING, JobState.COMPLETED}
        assert job.time_limit_minutes and job.time_limit_minutes > 0
    if release != "22.05":
        running = next(j for j in jobs if j.state is JobState.RUNNING)
        assert running.alloc_tres == {"cpu": 1.0, "mem": 500.0, "node": 1.0, "billing": 1.0}
        held = next(j for j in jobs if j.user == "bob")
        assert held.reason == "JobHeldUser" and held.start_time is None
    else:
        (job,) = jobs
        assert job.terminal and job.alloc_tres["gres/gpu"] == 1.0
        assert job.standard_output == "/home/alice/rest-%j.out"
