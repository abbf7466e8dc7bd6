"""slurm_ssh parsers and error mapping, table-driven, no network."""

from __future__ import annotations

import json
import pathlib
from datetime import UTC, datetime

import pytest

from adapters.slurm_ssh import errors, parse
from broker.adapter import (
    AdapterConfigError,
    ClusterUnreachable,
    SubmitOutcomeUnknown,
    SubmitRejected,
)
from broker.states import JobState

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "slurm"
TAG = "0123456789abcdef0123456789abcdef"
FAILED = "sbatch: error: Batch job submission failed: "


@pytest.mark.parametrize(
    ("text", "expected"),
    [("slurm 22.05.8\n", (22, 5)), ("slurm 24.11.5", (24, 11)), ("slurm-wlm 26.05.5", (26, 5))],
)
def test_version(text, expected):
    assert parse.parse_version(text) == expected


def test_version_missing():
    with pytest.raises(ValueError):
        parse.parse_version("command not found")


@pytest.mark.parametrize(
    ("out", "job_id"), [("123\n", "123"), ("123;lab\n", "123"), ("warning\n77\n", "77")]
)
def test_sbatch_job_id(out, job_id):
    assert parse.parse_sbatch_job_id(out) == job_id


@pytest.mark.parametrize("out", ["", "Submitted batch job x", "\n"])
def test_sbatch_job_id_missing(out):
    with pytest.raises(ValueError):
        parse.parse_sbatch_job_id(out)


@pytest.mark.parametrize(
    ("release", "name", "ids"),
    [
        ("22.05", "squeue_json_job657.json", ["657"]),
        ("24.11", "squeue_all.json", ["27", "28", "30"]),
        ("26.05", "squeue_all.json", ["2", "3", "5"]),
    ],
)
def test_squeue_json(release, name, ids):
    jobs = parse.parse_squeue_json((FIXTURES / release / name).read_text())
    assert [j.job_id for j in jobs] == ids


def test_squeue_json_skips_malformed_record():
    doc = json.loads((FIXTURES / "24.11" / "squeue_all.json").read_text())
    doc["jobs"].insert(0, {"job_id": None})
    doc["jobs"].insert(0, "garbage")
    assert len(parse.parse_squeue_json(json.dumps(doc))) == 3


@pytest.mark.parametrize("release", ["22.05", "24.11", "26.05"])
def test_squeue_poll_lines_read_as_the_json_of_the_same_jobs(release):
    """Captured on the dev clusters one after the other (bench: held, running, ended,
    an array with a running task and a pending record): every field the poll uses
    reads the same from the text line as from ``squeue --json``."""
    by_json = {j.job_id: j for j in parse.parse_squeue_json((FIXTURES / release / "squeue_poll_same_jobs.json").read_text())}
    jobs, skipped = parse.parse_squeue_poll((FIXTURES / release / "squeue_poll.txt").read_text(), FIXTURE_MARK)
    assert skipped == 0 and len(jobs) == len(by_json) == 6
    fields = ("raw_state", "state", "reason", "submit_time", "start_time", "user", "account", "alloc_tres", "array")
    for job in jobs:
        assert {f: getattr(job, f) for f in fields} == {f: getattr(by_json[job.job_id], f) for f in fields}
    assert {j.raw_state for j in jobs} == {"RUNNING", "PENDING", "COMPLETED"}
    assert sum(len(j.array.keys) for j in jobs if j.array) == 4


FIXTURE_MARK = "0123456789abcdef"  # the mark the fixtures were captured with
M = "fedcba9876543210"
LINE = "7|" + M + "|7|N/A|{state}|1796000000|{start}|alice|proj-a|cpu=1,mem=1G|{reason}|" + M


@pytest.mark.parametrize(("line", "expected"), [
    (LINE.format(state="PENDING", start="N/A", reason="JobHeldUser"),
     {"state": JobState.PENDING, "reason": "JobHeldUser", "start_time": None, "alloc_tres": {}}),
    (LINE.format(state="PENDING", start="1796000600", reason="Priority"),
     {"reason": "Priority", "start_time": datetime.fromtimestamp(1796000600, tz=UTC)}),
    (LINE.format(state="RUNNING", start="Unknown", reason="None"),
     {"state": JobState.RUNNING, "reason": None, "start_time": None, "alloc_tres": {"cpu": 1, "mem": 1024}}),
    # the controller's description instead of the code: the code, as --json gives it
    (LINE.format(state="PENDING", start="N/A", reason="ReqNodeNotAvail, UnavailableNodes:n[1-3]"),
     {"reason": "ReqNodeNotAvail"}),
    (LINE.format(state="FAILED", start="1796000001", reason="RaisedSignal:53(Real-time signal 19)"),
     {"reason": "RaisedSignal", "raw_state": "FAILED", "terminal": True}),
    (LINE.format(state="PENDING", start="N/A", reason="launch failed requeued held"),
     {"reason": "launch failed requeued held"}),
    (LINE.format(state="PENDING", start="N/A", reason="ReqNodeNotAvail, UnavailableNodes:a|b"),
     {"reason": "ReqNodeNotAvail"}),  # a | in the last field is no field boundary
    (LINE.format(state="PENDING", start="N/A", reason="Job is held by an admin"),
     {"reason": "Job is held by an admin"}),
    # a flag word wins over the base state (22.05's JSON does the same)
    (LINE.format(state="COMPLETING", start="1796000001", reason="None"),
     {"state": JobState.COMPLETING, "terminal": False}),
    (LINE.format(state="CANCELLED", start="N/A", reason="None"), {"state": JobState.CANCELLED, "terminal": True}),
    (LINE.format(state="SOMETHING_NEW", start="N/A", reason="None"), {"state": JobState.UNKNOWN}),
])
def test_squeue_poll_line(line, expected):
    (job,), skipped = parse.parse_squeue_poll(line + "\n", M)
    assert skipped == 0 and job.job_id == "7" and job.array is None
    assert {k: getattr(job, k) for k in expected} == expected


@pytest.mark.parametrize("line", [
    f"7|{M}|7|N/A|PENDING|1796000000|N/A|alice|proj-a|cpu=1|{M}",  # a field short
    f"x7|{M}|7|N/A|PENDING|1796000000|N/A|alice|proj-a|cpu=1|None|{M}",  # no job id
    f"0|{M}|0|N/A|PENDING|1796000000|N/A|alice|proj-a|cpu=1|None|{M}",
    f"7|{M}|7|N/A|PEND ING|1796000000|N/A|alice|proj-a|cpu=1|None|{M}",  # no state word
    f"7|{M}|7|N/A|PENDING|1796000000|N/A|alice|proj-a|cpu=1|None|{FIXTURE_MARK}",  # another poll's mark
    f"7|{FIXTURE_MARK}|7|N/A|PENDING|1796000000|N/A|alice|proj-a|cpu=1|None|{M}",
    f"7|{M}|7|N/A|PENDING|1796000000|N/A|alice|proj-a|cpu=1|ReqNodeNotAvail, UnavailableNodes:",  # a reason's
    f"n[4-9]|{M}",  # line break splits its line in two: neither half has both marks
    "7|7|N/A|PENDING|1796000000|N/A|alice|proj-a|cpu=1|None",  # no mark at all
])
def test_squeue_poll_skips_malformed_lines(line):
    good = f"8|{M}|8|N/A|RUNNING|1796000000|1796000001|alice|proj-a|cpu=1|None|{M}"
    jobs, skipped = parse.parse_squeue_poll(f"{good}\n{line}\n\n", M)
    assert [j.job_id for j in jobs] == ["8"] and skipped == 1


def test_squeue_poll_reads_only_the_wanted_jobs():
    text = "".join(f"{i}|{M}|{a}|{t}|PENDING|1796000000|N/A|u|acct|cpu=1|Priority|{M}\n"
                   for i, a, t in [(5, 5, "N/A"), (6, 6, "N/A"), (9, 7, "1"), (7, 7, "2-3"), (8, 8, "N/A")])
    jobs, skipped = parse.parse_squeue_poll(text + "garbage\n", M, {"5", "7"})
    assert [j.job_id for j in jobs] == ["5", "9", "7"] and skipped == 1
    assert [k for j in jobs if j.array for k, _ in j.array.keys] == ["7_1", "7_2", "7_3"]


@pytest.mark.parametrize("text", ['{"jobs": [', "squeue: error: Invalid field requested: tres-alloc\n"])
def test_squeue_poll_nothing_readable_is_an_error(text):
    with pytest.raises(ValueError):
        parse.parse_squeue_poll(text, M)
    assert parse.parse_squeue_poll("", M) == ([], 0)
    assert parse.parse_squeue_poll("\n", M) == ([], 0)


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"jobs": 3}'])
def test_json_without_jobs_is_an_error(text):
    with pytest.raises(ValueError):
        parse.parse_squeue_json(text)
    with pytest.raises(ValueError):
        parse.parse_sacct_json(text)


@pytest.mark.parametrize(
    ("release", "name"),
    [
        ("22.05", "sacct_json_job657.json"),
        ("24.11", "sacct_json_one_job.json"),
        ("26.05", "sacct_json_one_job.json"),
    ],
)
def test_sacct_json(release, name):
    (job,) = parse.parse_sacct_json((FIXTURES / release / name).read_text())
    assert job.state is JobState.COMPLETED and job.alloc_tres["gres/gpu"] == 1.0


def test_sacct_parsable_rows_and_malformed():
    good = (
        "42|42|bob|proj-b|cpu|COMPLETED|1795690600|1795690601|1795690661|60|5|"
        f"cpu=2,mem=1G,node=1|0:0|x|y.aifa-{TAG}"
    )
    pending = "43|43|bob|proj-b|cpu|PENDING|1795690600|Unknown|Unknown|0|5||0:0|p"
    task = "48|44_3|bob|proj-b|cpu|COMPLETED|1795690600|1795690601|1795690661|60|5|cpu=1|0:0|arr"
    waiting = "44|44_[4-9:2%2]|bob|proj-b|cpu|PENDING|1795690600|Unknown|Unknown|0|5||0:0|arr"
    text = "\n".join(
        [good, "short|row", pending, "abc|abc|bob|proj-b|cpu|COMPLETED|1|1|1|1|1||0:0|n", task, waiting, ""]
    )
    jobs, skipped = parse.parse_sacct_parsable(text)
    assert [j.job_id for j in jobs] == ["42", "43", "48", "44"]
    assert skipped == 2
    assert jobs[0].array is None
    assert jobs[2].array is not None and jobs[2].array.keys == [("44_3", 3)]
    assert jobs[2].to_usage_record().array_job_id == "44" and jobs[2].to_usage_record().array_task_id == 3
    assert jobs[3].array is not None and jobs[3].array.keys == [("44_4", 4), ("44_6", 6), ("44_8", 8)]
    assert jobs[0].name == f"x|y.aifa-{TAG}" and jobs[0].tag == TAG
    assert jobs[0].alloc_tres == {"cpu": 2.0, "mem": 1024.0, "node": 1.0}
    assert jobs[1].state is JobState.PENDING and jobs[1].end_time is None


def test_queue_text():
    text = (f"12|alice|1795690600|proj-a|n.aifa-{TAG}\n13_1|bob|1795690600|proj-a|arr\nbad\n"
            "14|bob|Unknown|proj-b|a|b\n15_[2-5%2]|bob|1795690600|proj-b|arr\nx_1|bob|1|p|n\n")
    lines = parse.parse_queue_text(text)
    # an array task (13_1) and an array's pending tasks (15_[2-5%2]) stand for the array job
    assert [(q.job_id, q.user, q.account, q.name) for q in lines] == [
        ("12", "alice", "proj-a", f"n.aifa-{TAG}"),
        ("13", "bob", "proj-a", "arr"),
        ("14", "bob", "proj-b", "a|b"),
        ("15", "bob", "proj-b", "arr"),
    ]
    assert lines[0].submit_time is not None and lines[2].submit_time is None


PARTITIONS = (
    "PartitionName=cpu AllowGroups=ALL AllowAccounts=ALL Default=YES MaxNodes=UNLIMITED "
    "MaxTime=UNLIMITED Nodes=vm State=UP TotalCPUs=8 TotalNodes=1 "
    "TRES=cpu=8,mem=7900M,node=1,billing=8,gres/gpu=4\n"
    "PartitionName=gpu Default=NO MaxTime=1-00:00:00 Nodes=vm State=UP TotalCPUs=8 TotalNodes=1 "
    "TRES=cpu=8,mem=7900M,node=1,billing=8,gres/gpu=4\n"
)
NODES = (
    "NodeName=vm Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 CPUTot=8 Gres=gpu:4 "
    "OS=Linux 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian RealMemory=7900 "
    "Partitions=cpu,gpu State=IDLE Reason=none here [root@2026-11-26T11:00:00]\n"
)


def test_scontrol_oneliner_and_partitions():
    nodes = parse.parse_scontrol_oneliner(NODES)
    assert nodes[0]["OS"] == "Linux 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian"
    assert nodes[0]["Reason"] == "none here [root@2026-11-26T11:00:00]"
    parts = parse.partitions_from_scontrol(parse.parse_scontrol_oneliner(PARTITIONS), nodes)
    cpu, gpu = parts
    assert cpu.name == "cpu" and cpu.default and cpu.max_time_minutes is None
    assert gpu.name == "gpu" and not gpu.default and gpu.max_time_minutes == 1440
    assert gpu.cpus_per_node == 8 and gpu.gpus_per_node == 4 and gpu.memory_per_node_mb == 7900
    assert gpu.nodes == 1 and gpu.tres["gres/gpu"] == 4.0


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("UNLIMITED", None),
        ("", None),
        ("30", 30),
        ("30:00", 30),
        ("30:01", 31),
        ("02:00:00", 120),
        ("1-00:00:00", 1440),
        ("2-12", 3600),
        ("1-01:30", 1530),
        ("junk", None),
    ],
)
def test_max_time(text, minutes):
    assert parse.parse_max_time(text) == minutes


@pytest.mark.parametrize(
    ("rc", "stderr", "kind", "code", "transient"),
    [
        (
            1,
            FAILED + "Invalid account or account/partition combination specified",
            SubmitRejected,
            "invalid_account",
            False,
        ),
        (
            1,
            FAILED + "Invalid partition name specified",
            SubmitRejected,
            "invalid_partition",
            False,
        ),
        (
            1,
            FAILED + "Job violates accounting/QOS policy (job submit limit, user's size limits)",
            SubmitRejected,
            "qos_limit",
            False,
        ),
        (
            1,
            FAILED + "Requested time limit is invalid (missing or exceeds some limit)",
            SubmitRejected,
            "invalid_time_limit",
            False,
        ),
        (
            1,
            FAILED + "Invalid generic resource (gres) specification",
            SubmitRejected,
            "invalid_gres",
            False,
        ),
        (
            1,
            FAILED + "Requested node configuration is not available",
            SubmitRejected,
            "resources_unavailable",
            False,
        ),
        (
            1,
            "sbatch: error: This does not look like a batch script.  The first\n"
            "sbatch: error: line must start with #! followed by the path to an interpreter.",
            SubmitRejected,
            "invalid_script",
            False,
        ),
        (
            1,
            "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying\n"
            + FAILED
            + "Resource temporarily unavailable",
            ClusterUnreachable,
            "scheduler_busy",
            True,
        ),
        (
            1,
            FAILED + "Socket timed out on send/recv operation",
            SubmitOutcomeUnknown,
            "scheduler_timeout",
            True,
        ),
        (
            1,
            FAILED + "Unable to contact slurm controller (connect failure)",
            ClusterUnreachable,
            "controller_unreachable",
            True,
        ),
        (
            1,
            "mkdir: cannot create directory '/x': Permission denied",
            SubmitRejected,
            "permission_denied",
            False,
        ),
        (
            1,
            FAILED + "Something new",
            SubmitRejected,
            "submit_rejected",
            False,
        ),
        (127, "sh: 1: sbatch: not found", AdapterConfigError, "slurm_not_found", False),
    ],
)
def test_submit_failures(rc, stderr, kind, code, transient):
    err = errors.submit_failure(rc, stderr)
    assert type(err) is kind
    assert err.code == code and err.transient is transient
    assert str(err) and "\n" not in str(err)


@pytest.mark.parametrize(
    "stderr",
    [
        "scancel: error: Kill job error on job id 5: Invalid job id specified",
        "scancel: error: Kill job error on job id 5: Job/step already completing or completed",
    ],
)
def test_cancel_already_gone_is_fine(stderr):
    assert errors.cancel_failure(1, stderr) is None


def test_cancel_permission_denied():
    err = errors.cancel_failure(
        210, "scancel: error: Kill job error on job id 5: Access/permission denied"
    )
    assert isinstance(err, SubmitRejected) and err.code == "permission_denied"


def test_query_failures():
    assert isinstance(
        errors.query_failure(
            "squeue", 1, "slurm_load_jobs error: Unable to contact slurm controller"
        ),
        ClusterUnreachable,
    )
    assert errors.query_failure("sacct", 127, "not found").code == "slurm_not_found"
