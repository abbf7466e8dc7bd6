"""slurm_ssh adapter logic over a scripted stand-in for the SSH pool (no network):
call counts of poll, accounting-lag handling, error mapping, usage and tags."""

from __future__ import annotations

import base64
import pathlib
import re
import shlex
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh

from adapters.slurm_ssh import SlurmSSHAdapter, commands
from adapters.slurm_ssh.certs import CertificateAuthority
from adapters.slurm_ssh.settings import SSHSettings
from adapters.slurm_ssh.transport import CommandResult
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterUnreachable,
    JobSpec,
    OutputTooLarge,
    SchedulerJobRef,
    SubmitOutcomeUnknown,
    SubmitRejected,
)
from broker.states import JobState

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "slurm"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPGAYKxMxx69R/urhyxzj2JUF0HLf+XAtUyR2mLr+edO"
TAG_A = "a" * 32
TAG_B = "b" * 32
NOW = int(datetime.now(tz=UTC).timestamp())
MARK = "{mark}"  # stands for the poll's random mark in scripted squeue lines


class FakePool:
    """Answers commands by the program they run (``sinfo``, ``squeue``...)."""

    def __init__(self, answers: dict[str, CommandResult | Exception]):
        self.answers = answers
        self.calls: list[tuple[str, str, dict]] = []

    def run(self, username: str, command: str, **kwargs) -> CommandResult:
        words = shlex.split(command)
        known = [w for w in words if w in self.answers]  # the program after ``env VAR=...``, else ``env``
        program = next((w for w in known if w != "env"), known[0] if known else words[-1])
        self.calls.append((username, command, kwargs))
        answer = self.answers[program]
        if isinstance(answer, Exception):
            raise answer
        if program == "squeue" and MARK in answer.stdout:  # the poll's own mark, as squeue prints it
            mark = re.search(r"JobID:0\|([0-9a-f]+)\|", command)
            answer = CommandResult(answer.exit_status, answer.stdout.replace(MARK, mark.group(1) if mark else "-"),
                                   answer.stderr, answer.seconds)
        return answer

    def stream_lines(self, username: str, command: str, *, failure: Any, **kwargs) -> Iterator[str]:
        """The same answer as ``run``, line by line; a failed command raises ``failure``'s error after them."""
        result = self.run(username, command, streamed=True, **kwargs)
        yield from result.stdout.splitlines()
        if result.exit_status:
            raise failure(result.exit_status, result.stderr)

    def close(self) -> None:
        pass


def ok(stdout: str = "", stderr: str = "") -> CommandResult:
    return CommandResult(0, stdout, stderr, 0.001)


def fail(rc: int, stderr: str) -> CommandResult:
    return CommandResult(rc, "", stderr, 0.001)


def settings(**extra) -> dict:
    return {
        "host": "login.example",
        "port": 2222,
        "host_key": HOST_KEY,
        "auth": "certificate",
        "ssh_ca_key_file": "/nonexistent/ca",
        **extra,
    }


def adapter(answers: dict, **extra) -> tuple[SlurmSSHAdapter, FakePool]:
    made = SlurmSSHAdapter("test", settings(**extra), data_dir="/tmp")
    pool = FakePool({"sinfo": ok("slurm 22.05.8\n"), **answers})
    made._pool = pool  # type: ignore[assignment]
    return made, pool


def squeue_doc(*jobs: tuple[int, str, str]) -> str:
    """The poll's squeue lines (``--Format``, ``|``-separated) of (id, state, reason)."""
    return "".join(
        f"{i}|{MARK}|{i}|N/A|{st}|{NOW - 30}|{NOW - 20}|alice|proj-a|cpu=1,mem=500M,node=1,billing=1|{reason}|{MARK}\n"
        for i, st, reason in jobs
    )


def sacct_row(
    job_id: int,
    state: str,
    name: str,
    *,
    end_ago: int = 10,
    limit: str = "5",
    exit_code: str = "0:0",
    account: str = "proj-a",
) -> str:
    end = NOW - end_ago
    return "|".join(
        [
            str(job_id),
            str(job_id),  # JobID (an array task would be "<array>_<task>")
            "alice",
            account,
            "cpu",
            state,
            str(NOW - 60),
            str(NOW - 50),
            str(end),
            "40",
            limit,
            "billing=1,cpu=1,gres/gpu=2,mem=500M,node=1",
            exit_code,
            name,
        ]
    )


def ref(job_id: str, tag: str | None = None) -> SchedulerJobRef:
    return SchedulerJobRef(job_id=job_id, username="alice", tag=tag)


# ----------------------------------------------------------------------------- poll


def test_poll_many_jobs_is_one_squeue_plus_one_sacct():
    queue = squeue_doc(
        (1, "RUNNING", "None"),
        (2, "PENDING", "JobHeldUser"),
        (3, "COMPLETED", "None"),
        (99, "RUNNING", "None"),
    )
    acct = "\n".join(
        [
            sacct_row(3, "COMPLETED", f"x.aifa-{TAG_A}"),
            sacct_row(4, "FAILED", "f", exit_code="3:0"),
            sacct_row(5, "COMPLETED", "allocation", limit="0"),
        ]
    )
    a, pool = adapter({"squeue": ok(queue), "sacct": ok(acct)})
    refs = [ref("1"), ref("2"), ref("3", TAG_A), ref("4"), ref("5"), ref("6")]
    statuses = {s.job_id: s for s in a.poll(refs)}
    assert a.scheduler_calls() == 2
    programs = [next(w for w in shlex.split(c) if w in {"squeue", "sacct"}) for _, c, _ in pool.calls]
    assert programs == ["squeue", "sacct"]
    assert "--jobs=1,2,3,4,5,6" in pool.calls[0][1] and "--json" not in pool.calls[0][1]
    assert "--jobs=3,4,5,6" in pool.calls[-1][1]
    assert statuses["1"].state is JobState.RUNNING and not statuses["1"].final
    assert statuses["2"].state is JobState.PENDING and statuses["2"].reason == "JobHeldUser"
    assert statuses["1"].reason is None and statuses["1"].alloc_tres["cpu"] == 1
    done = statuses["3"]
    assert done.final and done.state is JobState.COMPLETED and done.exit_code == 0
    assert done.alloc_tres["gres/gpu"] == 2.0 and done.elapsed_seconds == 40 and done.tag == TAG_A
    assert statuses["4"].final and statuses["4"].state is JobState.FAILED
    assert statuses["4"].exit_code == 3
    placeholder = statuses["5"]
    assert not placeholder.final and placeholder.state is JobState.COMPLETING
    assert placeholder.raw_state == "COMPLETED"
    assert "6" not in statuses, "a job nobody knows is omitted, never final"
    assert "99" not in statuses


def test_poll_all_queued_needs_no_sacct():
    a, _ = adapter({"squeue": ok(squeue_doc((1, "RUNNING", "None")))})
    (status,) = a.poll([ref("1")])
    assert status.state is JobState.RUNNING and a.scheduler_calls() == 1


def test_poll_names_a_few_jobs_and_reads_the_whole_queue_for_many():
    a, pool = adapter({"squeue": ok(squeue_doc((1, "RUNNING", "None")))}, slurm_release="22.05")
    a.poll([ref("1")])
    assert [shlex.split(c)[3] for _, c, _ in pool.calls] == ["squeue"], "no sinfo: every release filters text"
    assert "--jobs=1" in pool.calls[-1][1]
    many = [str(i) for i in range(1, commands.MAX_FILTERED_JOBS + 2)]
    queue = squeue_doc(*((int(i), "PENDING", "Priority") for i in many), (100000, "RUNNING", "None"))
    b, pool = adapter({"squeue": ok(queue)})
    statuses = {s.job_id: s for s in b.poll([ref(i) for i in many])}
    assert "--jobs" not in pool.calls[-1][1] and b.scheduler_calls() == 1
    assert sorted(statuses, key=int) == many, "other jobs' lines are passed over"
    assert {s.reason for s in statuses.values()} == {"Priority"}


def test_poll_reads_array_records_and_reason_codes():
    queue = "".join([
        f"41|{MARK}|40|3|RUNNING|{NOW}|{NOW}|alice|proj-a|cpu=2,mem=1G,node=1|None|{MARK}\n",
        f"40|{MARK}|40|4-6%2|PENDING|{NOW}|{NOW + 600}|alice|proj-a|cpu=2,mem=1G,node=1|JobArrayTaskLimit|{MARK}\n",
        f"50|{MARK}|50|N/A|PENDING|{NOW}|N/A|alice|proj-a|cpu=1|ReqNodeNotAvail, UnavailableNodes:n[1-2]|x|{MARK}\n",
    ])
    a, _ = adapter({"squeue": ok(queue)})
    refs = [SchedulerJobRef(job_id="40", username="alice", array_tasks=(3, 4, 5, 6)), ref("50")]
    statuses = {s.job_id: s for s in a.poll(refs)}
    assert sorted(statuses) == ["40_3", "40_4", "40_5", "40_6", "50"]
    assert statuses["40_3"].state is JobState.RUNNING and statuses["40_3"].array_task_id == 3
    assert statuses["40_3"].alloc_tres == {"cpu": 2, "mem": 1024, "node": 1}
    waiting = statuses["40_5"]
    assert waiting.state is JobState.PENDING and waiting.reason == "JobArrayTaskLimit" and not waiting.alloc_tres
    assert waiting.start_time is None and waiting.expected_start == datetime.fromtimestamp(NOW + 600, tz=UTC)
    assert statuses["50"].reason == "ReqNodeNotAvail" and statuses["50"].expected_start is None


def test_poll_single_purged_job():
    a, _ = adapter(
        {
            "squeue": fail(1, "slurm_load_jobs error: Invalid job id specified"),
            "env": ok(sacct_row(7, "TIMEOUT", "t")),
        }
    )
    (status,) = a.poll([ref("7")])
    assert status.final and status.state is JobState.TIMEOUT


def test_accounting_lag_setting_delays_final():
    a, _ = adapter(
        {"squeue": ok(squeue_doc()), "env": ok(sacct_row(7, "COMPLETED", "t", end_ago=5))},
        accounting_lag_seconds=3600,  # NOW is fixed at import: stay far from the edge
    )
    (status,) = a.poll([ref("7")])
    assert not status.final and status.state is JobState.COMPLETING


def test_sacct_failure_leaves_jobs_unconfirmed():
    a, _ = adapter(
        {
            "squeue": ok(squeue_doc((3, "COMPLETED", "None"))),
            "env": fail(1, "sacct: error: Problem talking to the database"),
        }
    )
    (status,) = a.poll([ref("3")])
    assert not status.final


def test_squeue_failure_raises_transient():
    a, _ = adapter({"squeue": fail(1, "slurm_load_jobs error: Unable to contact slurm controller")})
    with pytest.raises(ClusterUnreachable) as exc:
        a.poll([ref("1")])
    assert exc.value.transient


@pytest.mark.parametrize("forged", [
    f"60|{{guess}}|60|N/A|RUNNING|{NOW}|{NOW}|alice|proj-a|cpu=1|None|{{guess}}",  # a whole made-up line
    f"60|{{guess}}|60|N/A|RUNNING|{NOW}|{NOW}|alice|proj-a|cpu=1|None",  # ending in the carrier's own end
])
def test_a_line_break_in_a_reason_forges_no_job(forged):
    """Job 59's description holds line breaks and a made-up line of job 60 (RUNNING):
    no text in the queue can hold the poll's random mark, so the made-up line and the
    halves of job 59's line are skipped, and job 60 is left to accounting."""
    reason = "BurstBufferStageIn: x\n" + forged.format(guess="0123456789abcdef") + "\nmore"
    queue = (f"59|{MARK}|59|N/A|PENDING|{NOW}|N/A|mallory|proj-b|cpu=1|{reason}|{MARK}\n"
             f"61|{MARK}|61|N/A|RUNNING|{NOW}|{NOW}|alice|proj-a|cpu=1|None|{MARK}\n")
    a, _ = adapter({"squeue": ok(queue), "env": ok(sacct_row(60, "COMPLETED", "done"))})
    statuses = {s.job_id: s for s in a.poll([ref("59"), ref("60"), ref("61")])}
    assert statuses["60"].final and statuses["60"].state is JobState.COMPLETED
    assert statuses["61"].state is JobState.RUNNING and "59" not in statuses


def test_a_job_shown_twice_is_left_to_accounting():
    queue = squeue_doc((7, "RUNNING", "None"), (7, "PENDING", "Priority"), (8, "RUNNING", "None"))
    a, _ = adapter({"squeue": ok(queue), "env": ok(sacct_row(7, "FAILED", "f", exit_code="2:0"))})
    statuses = {s.job_id: s for s in a.poll([ref("7"), ref("8")])}
    assert statuses["7"].final and statuses["7"].exit_code == 2 and statuses["8"].state is JobState.RUNNING


def test_garbled_squeue_output_is_transient_error():
    a, _ = adapter({"squeue": ok('{"jobs": [')})
    with pytest.raises(AdapterError) as exc:
        a.poll([ref("1")])
    assert exc.value.transient and exc.value.code == "scheduler_output_invalid"


def test_duplicate_job_ids_pick_the_tagged_record():
    acct = "\n".join(
        [
            sacct_row(8, "FAILED", "old job", exit_code="1:0"),
            sacct_row(8, "COMPLETED", f"n.aifa-{TAG_B}"),
        ]
    )
    a, _ = adapter({"squeue": ok(squeue_doc()), "env": ok(acct)})
    (status,) = a.poll([ref("8", TAG_B)])
    assert status.state is JobState.COMPLETED and status.tag == TAG_B


def test_poll_queries_as_query_username_or_first_ref():
    a, pool = adapter({"squeue": ok(squeue_doc((1, "RUNNING", "None")))})
    a.poll([SchedulerJobRef(job_id="1", username="bob")])
    assert pool.calls[-1][0] == "bob"
    b, pool = adapter({"squeue": ok(squeue_doc((1, "RUNNING", "None")))}, query_username="reader")
    b.poll([SchedulerJobRef(job_id="1", username="bob")])
    assert pool.calls[-1][0] == "reader"


def test_poll_ignores_bad_ids_and_empty_input():
    a, pool = adapter({})
    assert a.poll([]) == []
    assert a.poll([ref("1;rm -rf /")]) == []
    assert pool.calls == []


# ----------------------------------------------------------------------------- submit, cancel


def spec(**kw) -> JobSpec:
    return JobSpec(
        tag=TAG_A,
        username="alice",
        account="proj-a",
        script="#!/bin/sh\ntrue\n",
        time_limit_minutes=5,
        **kw,
    )


def test_submit_sends_script_on_stdin_and_is_not_idempotent():
    a, pool = adapter({"mkdir": ok("123\n")})
    got = a.submit(spec())
    assert got.job_id == "123" and got.tag == TAG_A and got.username == "alice"
    user, command, kwargs = pool.calls[-1]
    assert user == "alice" and kwargs["stdin"] == b"#!/bin/sh\ntrue\n"
    assert kwargs["idempotent"] is False
    assert "sbatch --parsable" in command


def test_submit_refusal_and_unknown_outcome():
    a, _ = adapter(
        {
            "mkdir": fail(
                1,
                "sbatch: error: Batch job submission failed: "
                "Invalid account or account/partition combination specified",
            )
        }
    )
    with pytest.raises(SubmitRejected) as exc:
        a.submit(spec())
    assert exc.value.code == "invalid_account"
    b, _ = adapter({"mkdir": ok("")})
    with pytest.raises(SubmitOutcomeUnknown):
        b.submit(spec())


def test_cancel_paths():
    a, _ = adapter({"scancel": ok()})
    a.cancel(ref("5"))
    b, _ = adapter(
        {"scancel": fail(1, "scancel: error: Kill job error on job id 5: Invalid job id specified")}
    )
    b.cancel(ref("5"))
    c, _ = adapter(
        {
            "scancel": fail(
                210, "scancel: error: Kill job error on job id 5: Access/permission denied"
            )
        }
    )
    with pytest.raises(SubmitRejected) as exc:
        c.cancel(ref("5"))
    assert exc.value.code == "permission_denied"
    with pytest.raises(AdapterError):
        a.cancel(ref("$(reboot)"))


# ----------------------------------------------------------------------------- usage, tags, output


def test_usage_skips_malformed_unsettled_and_old_records():
    rows = [
        sacct_row(1, "COMPLETED", "direct sbatch job"),
        "garbage line",
        sacct_row(2, "COMPLETED", "allocation", limit="0"),
        sacct_row(3, "RUNNING", "r"),
        sacct_row(4, "CANCELLED by 1001", "c", end_ago=7200),
        "5|5|alice||cpu|COMPLETED|1|1|" + str(NOW - 5) + "|1|5||0:0|no account",
        sacct_row(6, "TIMEOUT", f"t.aifa-{TAG_B}", account="proj-b"),
    ]
    a, pool = adapter({"env": ok("\n".join(rows))}, query_username="reader")
    since = datetime.now(tz=UTC) - timedelta(hours=1)
    records = a.usage(since, accounts=["proj-a", "proj-b"])
    assert [r.job_id for r in records] == ["1", "6"]
    assert records[1].tag == TAG_B and records[1].state is JobState.TIMEOUT
    assert records[0].alloc_tres["gres/gpu"] == 2.0
    command = pool.calls[-1][1]
    assert "--accounts=proj-a,proj-b" in command and "--allusers" in command
    assert pool.calls[-1][0] == "reader"


@pytest.mark.parametrize(
    ("until_ago", "endtime", "kept"),
    [
        (None, "--endtime=now", ["1", "2", "3"]),
        (0, "--endtime=now", ["1", "2", "3"]),
        (60, "--endtime=now", ["1", "2"]),  # within the clock margin: sacct up to now, filtered here
        (1200, "--endtime=now-1140", ["1"]),  # widened by the 60 s margin, then filtered exactly
    ],
)
def test_usage_until_bounds_sacct_and_the_records(until_ago, endtime, kept, monkeypatch):
    # NOW was taken at import; a full run gets here minutes later, and "until" is
    # compared with the adapter's own clock (60 s of margin): the test's time is now
    monkeypatch.setattr(sys.modules[__name__], "NOW", int(datetime.now(tz=UTC).timestamp()))
    rows = [sacct_row(1, "COMPLETED", "a", end_ago=1800), sacct_row(2, "COMPLETED", "b", end_ago=120),
            sacct_row(3, "FAILED", "c", end_ago=30)]
    a, pool = adapter({"env": ok("\n".join(rows))}, query_username="reader")
    now = datetime.fromtimestamp(NOW, tz=UTC)
    until = None if until_ago is None else now - timedelta(seconds=until_ago)
    records = a.usage(now - timedelta(hours=1), accounts=["proj-a"], until=until)
    assert [r.job_id for r in records] == kept
    argv = shlex.split(pool.calls[-1][1])
    [given] = [w for w in argv if w.startswith("--endtime=")]
    if endtime == "--endtime=now":
        assert given == endtime
    else:  # relative; the clock moved on since NOW
        late = int(datetime.now(tz=UTC).timestamp()) - NOW
        assert 1140 <= int(given.removeprefix("--endtime=now-")) <= 1140 + late + 1
    [start] = [w for w in argv if w.startswith("--starttime=")]
    assert 3660 <= int(start.removeprefix("--starttime=now-")) <= 3660 + 2  # an hour + the 60 s margin


def test_iter_usage_streams_the_same_sacct_and_records_as_usage():
    rows = [sacct_row(1, "COMPLETED", "direct sbatch job"), "garbage line",
            sacct_row(2, "COMPLETED", "allocation", limit="0"), sacct_row(3, "RUNNING", "r"),
            sacct_row(6, "TIMEOUT", f"t.aifa-{TAG_B}", account="proj-b")]
    a, pool = adapter({"env": ok("\n".join(rows))}, query_username="reader")
    since = datetime.now(tz=UTC) - timedelta(hours=1)
    until = datetime.now(tz=UTC)
    listed = a.usage(since, accounts=["proj-a", "proj-b"], until=until)
    streamed = list(a.iter_usage(since, accounts=["proj-a", "proj-b"], until=until))
    assert streamed == listed and [r.job_id for r in streamed] == ["1", "6"]
    (_, read, _), (user, streamed_command, kwargs) = pool.calls[-2:]
    assert kwargs == {"streamed": True} and user == "reader"
    # the same sacct, but for the relative window's seconds (the clock moved between the calls)
    assert re.sub(r"now-[0-9]+", "now-N", read) == re.sub(r"now-[0-9]+", "now-N", streamed_command)
    a, _ = adapter({"env": fail(1, "sacct: error: Problem talking to the database")}, query_username="reader")
    with pytest.raises(AdapterError, match="Problem talking"):
        list(a.iter_usage(since, until=until))
    assert list(a.iter_usage(since, until=since)) == []


def test_usage_of_an_empty_window_asks_nothing():
    a, pool = adapter({}, query_username="reader")
    since = datetime.now(tz=UTC) - timedelta(hours=1)
    assert a.usage(since, until=since) == [] and a.usage(since, until=since - timedelta(hours=1)) == []
    assert pool.calls == []


def test_usage_past_the_output_cap_is_output_too_large():
    a, _ = adapter({"env": OutputTooLarge("command output exceeds max_output_bytes (1024)")},
                   query_username="reader")
    with pytest.raises(AdapterError) as exc:
        a.usage(datetime.now(tz=UTC) - timedelta(hours=1), until=datetime.now(tz=UTC))
    assert exc.value.code == "output_too_large" and not exc.value.transient


def test_cluster_wide_reads_need_a_query_user():
    a, _ = adapter({})
    with pytest.raises(AdapterConfigError) as exc:
        a.usage(datetime.now(tz=UTC))
    assert exc.value.code == "no_query_username"


def test_find_by_tag_from_queue_and_accounting():
    queue = f"12|alice|{NOW}|q.aifa-{TAG_A}\n13|bob|{NOW}|other\n"
    acct = "\n".join(
        [sacct_row(11, "COMPLETED", f"old.aifa-{TAG_A}"), sacct_row(9, "FAILED", f"b.aifa-{TAG_B}")]
    )
    a, pool = adapter({"squeue": ok(queue), "env": ok(acct)}, query_username="reader")
    found = a.find_by_tag([TAG_A, TAG_B, "c" * 32], since=datetime.now(tz=UTC) - timedelta(hours=1))
    assert found[TAG_A].job_id == "11", "duplicates: the first submitted wins"
    assert found[TAG_B].job_id == "9" and "c" * 32 not in found
    assert a.scheduler_calls() == 2
    assert "--accounts" not in pool.calls[-1][1] and "--account" not in pool.calls[-2][1]
    assert a.find_by_tag([]) == {}
    # the reconciler names the waiting jobs' accounts: accounting is read for them only
    found = a.find_by_tag([TAG_B], since=datetime.now(tz=UTC) - timedelta(hours=1), accounts=["proj-a", "proj-b"])
    assert found[TAG_B].job_id == "9"
    assert "--accounts=proj-a,proj-b" in shlex.split(pool.calls[-1][1])
    assert "--account=proj-a,proj-b" in shlex.split(pool.calls[-2][1])  # squeue


def test_read_output_paths_and_errors():
    a, pool = adapter({"tail": ok("last lines\n")})
    assert a.read_output(ref("42"), "stderr", tail=100) == "last lines\n"
    assert shlex.split(pool.calls[-1][1]) == [
        "tail",
        "-c",
        "100",
        "--",
        "$HOME/.aifa-broker/output/aifa-42.err",
    ]
    with pytest.raises(AdapterError):
        a.read_output(ref("42"), "stdin")
    b, _ = adapter(
        {"tail": fail(1, "tail: cannot open 'x' for reading: No such file or directory")}
    )
    with pytest.raises(AdapterError) as exc:
        b.read_output(ref("42"))
    assert exc.value.code == "output_unavailable"


def test_discover_from_scontrol():
    parts = "PartitionName=cpu Default=YES MaxTime=UNLIMITED Nodes=n1 TotalNodes=1 TRES=cpu=8,mem=16000M,node=1\n"
    nodes = "NodeName=n1 CPUTot=8 RealMemory=16000 Gres=(null) Partitions=cpu\n"

    class Scontrol(FakePool):
        def run(self, username, command, **kwargs):
            self.calls.append((username, command, kwargs))
            return ok(parts if "partition" in command else nodes)

    a, _ = adapter({}, query_username="reader")
    a._pool = Scontrol({})  # type: ignore[assignment]
    (cpu,) = a.discover()
    assert cpu.default and cpu.cpus_per_node == 8 and cpu.gpus_per_node == 0


# ----------------------------------------------------------------------------- settings, certificates


@pytest.mark.parametrize(
    "bad",
    [
        {"host": ""},
        {"host_key": None},
        {"host_key": "justonefield"},
        {"auth": "password"},
        {"ssh_ca_key_file": None},
        {"port": "22"},
        {"command_timeout": 0},
        {"auth": "key"},
        {"output_dir": "a\nb"},
    ],
)
def test_bad_settings(bad):
    with pytest.raises(AdapterConfigError):
        SlurmSSHAdapter("x", {**settings(), **bad}, data_dir="/tmp")


def test_settings_defaults_and_host_key_entry():
    cfg = SSHSettings.from_mapping(settings())
    assert cfg.host_key_entry == "[login.example]:2222"
    assert cfg.command_timeout == 30 and cfg.max_channels_per_connection == 8
    assert cfg.max_output_bytes == 16 * 1024 * 1024 and cfg.pool_idle_seconds == 60
    assert SSHSettings.from_mapping({**settings(), "port": 22}).host_key_entry == "login.example"
    key_mode = SSHSettings.from_mapping(
        {**settings(), "auth": "key", "service_username": "svc", "key_file": "/k"}
    )
    assert key_mode.login_for("alice") == "svc"
    assert cfg.login_for("alice") == "alice"


def test_missing_ca_file_is_a_config_error():
    ca = CertificateAuthority("/nonexistent/ca", 300)
    with pytest.raises(AdapterConfigError):
        ca.issue("alice")


def test_certificate_is_short_lived_for_one_principal(tmp_path):
    ca_key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "ca"
    path.write_bytes(
        ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    pkey = CertificateAuthority(str(path), 300, backdate_seconds=60).issue("alice")
    blob = pkey.public_blob
    assert blob is not None and blob.key_type == "ssh-ed25519-cert-v01@openssh.com"
    cert = ssh.load_ssh_public_identity(_openssh_line(blob))
    assert isinstance(cert, ssh.SSHCertificate)
    cert.verify_cert_signature()
    assert cert.valid_principals == [b"alice"]
    assert cert.type is ssh.SSHCertificateType.USER
    assert cert.valid_before - cert.valid_after == 360
    assert cert.signature_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ) == ca_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def _openssh_line(blob) -> bytes:
    return f"{blob.key_type} {base64.b64encode(blob.key_blob).decode()}".encode()


class SequencePool(FakePool):
    """Answers each ``scancel`` with the next result of a list."""

    def __init__(self, results: list[CommandResult]):
        super().__init__({"scancel": ok()})
        self.results = results

    def run(self, username: str, command: str, **kwargs) -> CommandResult:
        self.calls.append((username, command, kwargs))
        return self.results.pop(0)


def test_cancel_without_exit_status_asks_once_more():
    """CI on a loaded host: the channel of one of eight concurrent scancels closed
    without an exit status (the command died of a signal after its RPC). scancel is
    idempotent: ask again; a second failure is reported, not hidden."""
    a, _ = adapter({})
    a._pool = pool = SequencePool([fail(-1, ""), fail(1, "scancel: error: Kill job error on job id 5: "
                                                          "Job/step already completing or completed")])
    a.cancel(ref("5"))
    assert len(pool.calls) == 2
    b, _ = adapter({})
    b._pool = pool = SequencePool([fail(-1, ""), fail(-1, "")])
    with pytest.raises(ClusterUnreachable):
        b.cancel(ref("5"))
    assert len(pool.calls) == 2
