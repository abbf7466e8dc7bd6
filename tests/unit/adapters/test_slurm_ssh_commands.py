"""slurm_ssh command builders: argv shape, and the rendered command run by a
real /bin/sh against a stand-in ``sbatch`` that records what it received."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest

from adapters.slurm_ssh import commands
from broker.adapter import JobSpec, SubmitRejected

TAG = "0123456789abcdef0123456789abcdef"
NASTY = "a;b|c&d$(touch PWNED)`touch PWNED2`'\"\n-x \\ ,=%j *"
#: the same without a newline (names, partitions and paths may not hold one)
ONE_LINE = NASTY.replace("\n", " ")

FAKE_SBATCH = r"""#!PYTHON
import json, os, sys
args = sys.argv[1:]
env_records = None
for a in args:
    if a.startswith("--export-file="):
        fd = int(a.split("=", 1)[1])
        with os.fdopen(fd, "rb") as f:
            env_records = f.read().decode()
record = {"argv": args, "stdin": sys.stdin.read(), "env": env_records}
with open(os.environ["RECORD"], "w") as f:
    json.dump(record, f)
print("4242")
"""


def spec(**overrides) -> JobSpec:
    base = dict(
        tag=TAG,
        username="alice",
        account="proj-a",
        script="#!/bin/bash\necho hi\n",
        time_limit_minutes=5,
    )
    base.update(overrides)
    return JobSpec(**base)


@pytest.fixture
def fake_cluster(tmp_path: pathlib.Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH.replace("PYTHON", sys.executable))
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    home = tmp_path / "home"
    home.mkdir()

    def run(cmd: commands.SubmitCommand) -> dict:
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": str(home),
            "RECORD": str(tmp_path / "record.json"),
        }
        out = subprocess.run(
            ["/bin/sh", "-c", cmd.command],
            input=cmd.stdin,
            env=env,
            cwd=home,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == b"4242"
        assert not list(tmp_path.rglob("PWNED*")), "something was executed"
        return json.loads((tmp_path / "record.json").read_text())

    run.home = home  # type: ignore[attr-defined]
    return run


def test_every_resource_option_on_the_command_line():
    s = spec(
        partition="gpu",
        nodes=2,
        ntasks_per_node=4,
        cpus_per_task=8,
        gpus_per_node=4,
        memory_per_node_mb=65536,
        name="train",
        working_directory="/scratch/alice",
    )
    argv = [
        a if isinstance(a, str) else a.render()
        for a in commands.sbatch_argv(s, "/out", export_file=False)
    ]
    start = argv.index("sbatch")
    assert argv[0] == "env" and all(a.startswith("--unset=S") for a in argv[1:start])
    assert "--unset=SBATCH_GPUS" in argv[:start] and "--unset=SBATCH_ACCOUNT" in argv[:start]
    assert argv[start:start + 4] == ["sbatch", "--parsable", "--ignore-pbs", "--export=ALL"]
    for expected in [
        "--account=proj-a",
        "--partition=gpu",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--gres=gpu:4",
        "--mem=65536M",
        "--time=5",
        f"--job-name=train.aifa-{TAG}",
        f"--comment=aifa-broker:{TAG}",
        "--chdir=/scratch/alice",
        "--output=/out/aifa-%j.out",
        "--error=/out/aifa-%j.err",
    ]:
        assert expected in argv


def test_optional_options_left_out():
    argv = [a for a in commands.sbatch_argv(spec(), "o", export_file=False) if isinstance(a, str)]
    assert not [a for a in argv if a.startswith(("--partition", "--gres", "--mem", "--chdir"))]


def test_submit_runs_exactly_as_given_through_a_real_shell(fake_cluster):
    script = f"#!/bin/bash\n##SBATCH --comment=x\necho '{NASTY}'\n$(touch PWNED3)\n"
    s = spec(
        script=script,
        name=f"-{ONE_LINE}",
        partition=f"-p{ONE_LINE}",
        working_directory=f"/tmp/{ONE_LINE}",
        environment={"A": NASTY, "B_2": "x,y,z", "EMPTY": "", "MULTI": "l1\nl2"},
    )
    record = fake_cluster(commands.build_submit(s, ".aifa-broker/output"))
    assert record["stdin"] == script
    assert f"--job-name=-{ONE_LINE}.aifa-{TAG}" in record["argv"]
    assert f"--partition=-p{ONE_LINE}" in record["argv"]
    assert f"--chdir=/tmp/{ONE_LINE}" in record["argv"]
    assert "--export-file=3" in record["argv"]
    home = fake_cluster.home
    assert f"--output={home}/.aifa-broker/output/aifa-%j.out" in record["argv"]
    assert (home / ".aifa-broker" / "output").is_dir()
    records = record["env"].split("\0")
    assert f"HOME={home}" in records, "the login environment comes first"
    assert records[-6:] == [
        f"A={NASTY}",
        "B_2=x,y,z",
        "EMPTY=",
        "MULTI=l1\nl2",
        f"SLURM_JOB_NAME=-{ONE_LINE}.aifa-{TAG}",
        "",
    ]


def test_submit_without_environment_has_no_export_file(fake_cluster):
    cmd = commands.build_submit(spec(), "/abs/out")
    assert "export-file" not in cmd.command
    assert "mkdir -p -m 700 /abs/out" in cmd.command


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"1BAD": "x"}, "invalid_environment"),
        ({"A-B": "x"}, "invalid_environment"),
        ({"A B": "x"}, "invalid_environment"),
        ({"": "x"}, "invalid_environment"),
        ({"SLURM_JOB_ID": "1"}, "invalid_environment"),
        ({"SBATCH_ACCOUNT": "other"}, "invalid_environment"),
        ({"A": "nul\x00"}, "invalid_environment"),
    ],
)
def test_bad_environment_rejected(env, code):
    with pytest.raises(SubmitRejected) as exc:
        commands.build_submit(spec(environment=env), "o")
    assert exc.value.code == code and not exc.value.transient


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"script": "echo no shebang"}, "invalid_script"),
        ({"script": "#!/bin/sh\n#SBATCH --array=1-10\necho"}, "unsupported_directive"),
        ({"script": "#!/bin/sh\n#SLURM --gres=gpu:4\necho"}, "unsupported_directive"),
        ({"script": "#!/bin/sh\n#SBATCH -a 1-3\n"}, "unsupported_directive"),
        ({"script": "#!/bin/sh\necho \x00"}, "invalid_script"),
        ({"nodes": 0}, "invalid_request"),
        ({"time_limit_minutes": 0}, "invalid_request"),
        ({"gpus_per_node": -1}, "invalid_request"),
        ({"memory_per_node_mb": 0}, "invalid_request"),
        ({"account": ""}, "invalid_request"),
        ({"name": "two\nlines"}, "invalid_request"),
        ({"partition": ""}, "invalid_request"),
    ],
)
def test_bad_requests_rejected(overrides, code):
    with pytest.raises(SubmitRejected) as exc:
        commands.build_submit(spec(**overrides), "o")
    assert exc.value.code == code


def test_array_directive_after_commands_is_ignored_by_slurm_and_us():
    commands.build_submit(spec(script="#!/bin/sh\necho\n#SBATCH --array=1-3\n"), "o")


def test_home_path_rendering():
    assert commands.HomePath("/abs/x y").render() == "'/abs/x y'"
    assert commands.HomePath("rel/x y", "--output=").render() == "--output=\"$HOME\"/'rel/x y'"
    assert shlex.split(commands.build_tail(".aifa-broker/output/aifa-1.out", 100)) == [
        "tail",
        "-c",
        "100",
        "--",
        "$HOME/.aifa-broker/output/aifa-1.out",
    ]


@pytest.mark.parametrize(
    ("ids", "jobs_option"),
    [
        (["7", "12"], "--jobs=7,12"),
        ([str(i) for i in range(1, commands.MAX_FILTERED_JOBS + 1)], "--jobs=1,2,3,"),
        ([str(i) for i in range(1, commands.MAX_FILTERED_JOBS + 2)], None),  # squeue's filter costs more
        ([], None),
    ],
)
def test_squeue_poll(ids, jobs_option):
    argv = shlex.split(commands.build_squeue_poll(ids, "0123456789abcdef"))
    assert argv[:4] == ["env", "SLURM_TIME_FORMAT=%s", "SLURM_BITSTR_LEN=0", "squeue"]
    assert {"--noheader", "--all", "--states=all"} <= set(argv) and "--json" not in argv
    fmt = next(w for w in argv if w.startswith("--Format="))
    assert fmt == "--Format=JobID:0|0123456789abcdef|,ArrayJobID:0|,ArrayTaskID:0|,State:0|,SubmitTime:0|," \
        "StartTime:0|,UserName:0|,Account:0|,tres-alloc:0|,Reason:0|0123456789abcdef"
    given = [w for w in argv if w.startswith("--jobs=")]
    if jobs_option is None:
        assert given == []
    else:
        assert given[0].startswith(jobs_option) and given[0].split("=")[1].split(",") == ids


@pytest.mark.parametrize("bad", ["1;reboot", "$(id)", "1,2", "-1", "7_[1-3]"])
def test_squeue_poll_refuses_what_is_no_job_id(bad):
    with pytest.raises(ValueError):
        commands.build_squeue_poll(["1", bad], "0123456789abcdef")


@pytest.mark.parametrize("mark", ["", "short", "0123456789ABCDEF", "0123456789abcdef|", "0123456789abcde,"])
def test_squeue_poll_mark_is_hex(mark):
    with pytest.raises(ValueError):
        commands.build_squeue_poll(["1"], mark)


def test_queries():
    jobs = shlex.split(commands.build_sacct_jobs(["7", "8"]))
    assert jobs[:3] == ["env", "SLURM_TIME_FORMAT=%s", "sacct"]
    assert "--jobs=7,8" in jobs and "--allusers" in jobs and "--parsable2" in jobs
    assert commands.build_cancel("12") == "scancel 12"
    window = shlex.split(
        commands.build_sacct_window(3600, accounts=["proj-a", "proj-b"], terminal_only=True)
    )
    assert window[:3] == ["env", "SLURM_TIME_FORMAT=%s", "sacct"]
    assert "--starttime=now-3600" in window and "--accounts=proj-a,proj-b" in window
    assert any(w.startswith("--state=") for w in window)
    fmt = next(w for w in window if w.startswith("--format="))
    assert fmt.startswith("--format=JobIDRaw,") and fmt.endswith(",JobName")
    with pytest.raises(ValueError):
        commands.build_sacct_window(10, accounts=["a,b"])
    assert shlex.split(commands.build_find_queue())[-1] == "--format=%i|%u|%V|%a|%j"


@pytest.mark.parametrize(
    ("back", "until_back", "start", "end"),
    [
        (3600, 0, "--starttime=now-3600", "--endtime=now"),  # open-ended: up to now
        (3600, 600, "--starttime=now-3600", "--endtime=now-600"),
        (90_000, 86_400, "--starttime=now-90000", "--endtime=now-86400"),
        (0, 0, "--starttime=now-1", "--endtime=now"),  # at least one second back
        (3600, -5, "--starttime=now-3600", "--endtime=now"),  # a bound in the future: now
    ],
)
def test_sacct_window_bounds(back, until_back, start, end):
    """``until`` becomes ``--endtime=now-N``, relative like the start; both appear once."""
    argv = shlex.split(commands.build_sacct_window(back, terminal_only=True, until_seconds_back=until_back))
    assert [w for w in argv if w.startswith("--starttime=")] == [start]
    assert [w for w in argv if w.startswith("--endtime=")] == [end]
    # end states given: sacct selects by end time inside the window (see the builder's docstring)
    assert f"--state={','.join(commands.TERMINAL_STATE_CODES)}" in argv


@pytest.mark.parametrize(("back", "until_back"), [(600, 600), (600, 3600)])
def test_sacct_window_refuses_an_empty_window(back, until_back):
    with pytest.raises(ValueError):
        commands.build_sacct_window(back, until_seconds_back=until_back)


@pytest.mark.parametrize("bad", ["", "1;rm", "-1", "12 13", "1_", "_2", "1_2_3", "1_[2]", "x" * 3, "1" * 13])
def test_job_ids_validated(bad):
    with pytest.raises(ValueError):
        commands.build_cancel(bad)
    with pytest.raises(ValueError):
        commands.build_sacct_jobs(["1", bad])


def test_array_task_ids_are_job_ids():
    assert shlex.split(commands.build_cancel("12_3"))[-1] == "12_3"


def test_array_output_per_task():
    argv = commands.sbatch_argv(spec(array="0-3%2"), "out", export_file=False)
    assert "--array=0-3%2" in argv
    paths = [a.path for a in argv if isinstance(a, commands.HomePath)]
    assert paths == ["out/aifa-%A_%a.out", "out/aifa-%A_%a.err"]


def test_fake_sbatch_is_not_on_the_real_path():
    assert os.environ.get("RECORD") is None
