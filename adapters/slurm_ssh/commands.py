"""Pure builders of the remote commands the ``slurm_ssh`` adapter runs.

Every command is an argv list; :func:`render` joins it with :func:`shlex.quote`
so the remote login shell sees each element as one literal word. Nothing from a
job request is ever interpreted by that shell: the script travels on stdin,
resource options are single ``--option=value`` words (a value starting with
``-`` stays a value), and the job's environment goes through
``sbatch --export-file`` as NUL-separated ``NAME=value`` records, so commas,
quotes, newlines and ``$( )`` in values arrive intact.

The only shell syntax in a rendered command is fixed text written here:
``&&`` between steps, the ``"$HOME"`` prefix of a home-relative path, and the
file-descriptor plumbing that feeds ``--export-file``.

Requirements on the login node: a POSIX login shell (sh, bash, dash, ksh,
zsh; not csh/tcsh) for the users, and GNU ``env`` (``env -0``) when jobs carry
an environment.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from adapters.slurm_common.accounting import SACCT_PARSABLE_FIELDS
from adapters.slurm_common.queue import SQUEUE_POLL_FIELDS
from adapters.slurm_common.tags import comment_for_tag, job_name_with_tag
from broker.adapter import JobSpec, SubmitRejected, refuse_directives

__all__ = [
    "ENV_NAME_RE",
    "JOB_ID_RE",
    "TERMINAL_STATE_CODES",
    "HomePath",
    "SubmitCommand",
    "build_cancel",
    "build_discover_nodes",
    "build_discover_partitions",
    "build_find_queue",
    "build_health",
    "build_sacct_jobs",
    "build_sacct_window",
    "build_squeue_poll",
    "build_submit",
    "build_tail",
    "build_version",
    "output_paths",
    "render",
    "validate_job_id",
]

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: a Slurm job id, or one array task of it (``123_4``)
JOB_ID_RE = re.compile(r"^[0-9]{1,12}(?:_[0-9]{1,7})?$")
#: Environment names the job may not set: they steer sbatch itself.
RESERVED_ENV_PREFIXES = ("SLURM_", "SBATCH_")
#: ``sacct --state`` codes of end states (usage import).
TERMINAL_STATE_CODES = ("CA", "CD", "DL", "F", "NF", "OOM", "PR", "TO", "BF")
#: fd number the environment records are read from (``--export-file=3``).
EXPORT_FD = 3
#: sbatch's input environment variables (Slurm 22.05-26.05, ``src/sbatch/opt.c``): a
#: user's login files could set them and add to the job behind the broker's back, so
#: sbatch runs without them (the command line sets everything the job asks for).
SBATCH_INPUT_ENV = (
    "ACCOUNT", "ACCTG_FREQ", "ARRAY_INX", "BATCH", "BURST_BUFFER", "CLUSTERS", "CLUSTER_CONSTRAINT",
    "CONSOLIDATE_SEGMENTS", "CONSTRAINT", "CONTAINER", "CONTAINER_ID", "CONTAINER_TYPE", "CORE_SPEC",
    "CPUS_PER_GPU", "CPU_FREQ_REQ", "DEBUG", "DELAY_BOOT", "DISTRIBUTION", "ERROR", "EXCLUSIVE", "EXPORT",
    "GET_USER_ENV", "GPUS", "GPUS_PER_NODE", "GPUS_PER_SOCKET", "GPUS_PER_TASK", "GPU_BIND", "GPU_FREQ",
    "GRES", "GRES_FLAGS", "HINT", "IGNORE_PBS", "INPUT", "JOB_NAME", "MEM_BIND", "MEM_PER_CPU", "MEM_PER_GPU",
    "MEM_PER_NODE", "NETWORK", "NO_KILL", "NO_REQUEUE", "OPEN_MODE", "OUTPUT", "OVERCOMMIT", "PARTITION",
    "POWER", "PROFILE", "QOS", "REQUEUE", "REQ_SWITCH", "RESERVATION", "SEGMENT_SIZE", "SIGNAL", "SPREAD_JOB",
    "SPREAD_SEGMENTS", "THREADS_PER_CORE", "THREAD_SPEC", "TIMELIMIT", "TRES_BIND", "TRES_PER_TASK",
    "USE_MIN_NODES", "WAIT", "WAIT_ALL_NODES", "WCKEY",
)
SLURM_TIME_FORMAT_ENV = "SLURM_TIME_FORMAT=%s"


@dataclass(frozen=True)
class HomePath:
    """A path relative to the remote user's home; rendered as ``"$HOME"/'rel'``
    (absolute paths render as themselves). ``prefix`` is an option text such as
    ``--output=`` glued in front."""

    path: str
    prefix: str = ""

    def render(self) -> str:
        """The shell word for this argument."""
        if self.path.startswith("/"):
            return shlex.quote(self.prefix + self.path)
        head = shlex.quote(self.prefix) if self.prefix else ""
        return f'{head}"$HOME"/{shlex.quote(self.path)}'


Arg = str | HomePath


def render(*argvs: Sequence[Arg], joiner: str = " && ") -> str:
    """One remote shell command from argv lists, each word quoted, steps joined
    with ``&&`` (or ``joiner``)."""
    steps = [" ".join(_word(a) for a in argv) for argv in argvs]
    return joiner.join(steps)


def _word(arg: Arg) -> str:
    return arg.render() if isinstance(arg, HomePath) else shlex.quote(arg)


def validate_job_id(job_id: str) -> str:
    """The job id if it is a Slurm job id (digits) or array task (``123_4``); else ValueError."""
    if not JOB_ID_RE.match(job_id or ""):
        raise ValueError(f"not a Slurm job id: {job_id!r}")
    return job_id


# --------------------------------------------------------------------------- submit


@dataclass(frozen=True)
class SubmitCommand:
    """What runs on the login node for one submission."""

    command: str
    stdin: bytes


def output_paths(output_dir: str, job_id: str = "%j") -> tuple[str, str]:
    """The stdout and stderr file of a job (``%j`` = Slurm's job-id pattern)."""
    base = output_dir.rstrip("/") or "/"
    return f"{base}/aifa-{job_id}.out", f"{base}/aifa-{job_id}.err"


def _reject(code: str, detail: str) -> SubmitRejected:
    return SubmitRejected(detail, code=code)


def validate_environment(environment: Mapping[str, str]) -> list[str]:
    """``NAME=value`` records for ``--export-file``; raises SubmitRejected
    (``invalid_environment``) on a bad name, a reserved name or a NUL byte."""
    records: list[str] = []
    for name, value in environment.items():
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            raise _reject("invalid_environment", f"invalid environment variable name {name!r}")
        if name.upper().startswith(RESERVED_ENV_PREFIXES):
            raise _reject("invalid_environment", f"environment variable {name} is reserved")
        if not isinstance(value, str) or "\x00" in value:
            raise _reject("invalid_environment", f"environment variable {name}: invalid value")
        records.append(f"{name}={value}")
    return records


def _validate_sizes(spec: JobSpec) -> None:
    sizes = {
        "nodes": spec.nodes,
        "ntasks_per_node": spec.ntasks_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "time_limit_minutes": spec.time_limit_minutes,
    }
    for field_name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _reject("invalid_request", f"{field_name} must be a positive integer")
    if isinstance(spec.gpus_per_node, bool) or spec.gpus_per_node < 0:
        raise _reject("invalid_request", "gpus_per_node must be >= 0")
    if spec.memory_per_node_mb is not None and spec.memory_per_node_mb < 1:
        raise _reject("invalid_request", "memory_per_node_mb must be positive")


def _validate_text(spec: JobSpec) -> None:
    for field_name in ("account", "username", "tag", "name"):
        value = getattr(spec, field_name)
        if not isinstance(value, str) or not value or any(c in value for c in "\x00\n\r"):
            raise _reject("invalid_request", f"{field_name} is empty or has control characters")
    for field_name in ("partition", "working_directory"):
        value = getattr(spec, field_name)
        if value is not None and (not value or "\x00" in value or "\n" in value):
            raise _reject("invalid_request", f"{field_name} is empty or has control characters")


def _validate_script(script: str) -> bytes:
    if "\x00" in script:
        raise _reject("invalid_script", "the script contains a NUL byte")
    if not script.startswith("#!"):
        raise _reject("invalid_script", "the script must start with #! and an interpreter")
    refuse_directives(script)
    return script.encode("utf-8")


def sbatch_argv(spec: JobSpec, output_dir: str, *, export_file: bool) -> list[Arg]:
    """``sbatch`` with every resource option of ``spec`` on the command line."""
    out, err = output_paths(output_dir)
    argv: list[Arg] = ["env", *(f"--unset=SBATCH_{name}" for name in SBATCH_INPUT_ENV), "--unset=SLURM_HINT",
                       "sbatch", "--parsable", "--ignore-pbs", "--export=ALL"]
    if export_file:
        argv.append(f"--export-file={EXPORT_FD}")
    argv.append(f"--account={spec.account}")
    if spec.partition:
        argv.append(f"--partition={spec.partition}")
    nodes = f"{spec.min_nodes}-{spec.nodes}" if spec.min_nodes and spec.min_nodes < spec.nodes else str(spec.nodes)
    argv += [
        f"--nodes={nodes}",
        f"--ntasks-per-node={spec.ntasks_per_node}",
        f"--cpus-per-task={spec.cpus_per_task}",
    ]
    if spec.ntasks is not None:
        argv.append(f"--ntasks={spec.ntasks}")
    if spec.gpus_per_node:
        gpu = f"gpu:{spec.gpu_type}:" if spec.gpu_type else "gpu:"
        argv.append(f"--gres={gpu}{spec.gpus_per_node}")
    if spec.exclusive:
        argv.append("--exclusive")
    for option, value in (("constraint", spec.constraint), ("mail-type", spec.mail_type),
                          ("mail-user", spec.mail_user), ("array", spec.array),
                          ("dependency", spec.dependency)):
        if value:
            argv.append(f"--{option}={value}")
    if spec.memory_per_node_mb is not None:
        argv.append(f"--mem={spec.memory_per_node_mb}M")
    argv += [
        f"--time={spec.time_limit_minutes}",
        f"--job-name={job_name_with_tag(spec.name, spec.tag)}",
        f"--comment={comment_for_tag(spec.tag)}",
    ]
    if spec.working_directory:
        argv.append(f"--chdir={spec.working_directory}")
    if spec.array:  # one file per task: %A_%a = <array id>_<task> (how the broker names tasks)
        out, err = output_paths(output_dir, "%A_%a")
    argv += [HomePath(out, "--output="), HomePath(err, "--error=")]
    return argv


def build_submit(spec: JobSpec, output_dir: str) -> SubmitCommand:
    """The submission: create the output directory, then ``sbatch`` with the
    script on stdin.

    Without an environment: plain ``sbatch --export=ALL``. With one, sbatch
    reads the job's environment from ``--export-file=3``, which *replaces* the
    ``ALL`` copy of its own environment; so the pipe carries the login
    environment (``env -0``), then the request's ``NAME=value`` records (later
    records win), then ``SLURM_JOB_NAME`` (which sbatch only sets in the ALL
    case), all NUL-separated. The script stays on the channel's stdin, saved
    as fd 4 around the pipe.
    """
    _validate_text(spec)
    _validate_sizes(spec)
    script = _validate_script(spec.script)
    records = validate_environment(spec.environment)
    mkdir: list[Arg] = ["mkdir", "-p", "-m", "700", HomePath(output_dir.rstrip("/") or "/")]
    sbatch = render(sbatch_argv(spec, output_dir, export_file=bool(records)))
    if not records:
        return SubmitCommand(f"{render(mkdir)} && {sbatch}", script)
    records.append(f"SLURM_JOB_NAME={job_name_with_tag(spec.name, spec.tag)}")
    printf = render(["printf", "%s\\000", *records])
    plumbing = f"{EXPORT_FD}<&0 0<&4 4<&-"
    feed = f"{{ env -0 && {printf}; }}"
    return SubmitCommand(f"{render(mkdir)} && exec 4<&0 && {feed} | {sbatch} {plumbing}", script)


def build_test_only(spec: JobSpec, output_dir: str) -> SubmitCommand:
    """``sbatch --test-only``: the scheduler's own answer to "when would this start",
    nothing submitted. Same options as the submission (the environment does not
    change when a job starts, so it is left out); times printed in UTC."""
    _validate_text(spec)
    _validate_sizes(spec)
    script = _validate_script(spec.script)
    argv = sbatch_argv(spec, output_dir, export_file=False)
    at = argv.index("sbatch")
    argv[at:at + 1] = ["TZ=UTC", "sbatch", "--test-only"]
    return SubmitCommand(render(argv), script)


# --------------------------------------------------------------------------- queries


def build_version() -> str:
    """``sinfo --version`` (no controller round-trip)."""
    return render(["sinfo", "--version"])


#: POSIX user / Slurm account names the broker passes to lookups (quoted anyway)
SCHEDULER_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")


def validate_name(value: str, what: str) -> str:
    """A user or account name fit for a lookup; else ValueError."""
    if not SCHEDULER_NAME_RE.match(value or ""):
        raise ValueError(f"not a valid {what}: {value!r}")
    return value


def build_show_config() -> str:
    """The controller's configuration (``ClusterName``, ``SlurmctldHost``)."""
    return render(["scontrol", "show", "config"])


def build_account_lookup(account: str) -> str:
    """The account's name from Slurm's accounting when it exists (empty output otherwise)."""
    return render(["sacctmgr", "--noheader", "--parsable2", "show", "account",
                   validate_name(account, "account name"), "format=Account"])


def build_user_lookup(username: str) -> str:
    """The POSIX user's passwd entry (``getent`` exits 2 when there is none)."""
    return render(["getent", "passwd", validate_name(username, "user name")])


def build_health() -> str:
    """Version plus a controller round-trip (partition list)."""
    return render(["sinfo", "--version"], ["sinfo", "--noheader", "--format=%R"])


#: most job ids a poll names with ``--jobs``; more read the whole queue. squeue filters
#: on the client, comparing every queue record with every id: 2,000 ids on a 9,000-job
#: queue took 0.74 s of squeue against 0.16 s for printing the whole queue (22.05 dev
#: cluster, bench/squeue_formats.py); at 300 ids the filter costs about what printing
#: the records it saves would.
MAX_FILTERED_JOBS = 300


_MARK_RE = re.compile(r"^[0-9a-f]{16,64}$")


def build_squeue_poll(job_ids: Sequence[str], mark: str) -> str:
    """One ``squeue``, every state (a job that just ended still shows), a line per job
    with the fields of :data:`~adapters.slurm_common.queue.SQUEUE_POLL_FIELDS`
    separated by ``|`` and ``mark`` (random hex, new for each poll) after the job id
    and at the end (see :func:`~adapters.slurm_common.queue.split_poll_line`), times
    as epoch seconds, array task lists never abbreviated (``SLURM_BITSTR_LEN=0``). Up
    to :data:`MAX_FILTERED_JOBS` ids go in ``--jobs`` (every release honours it in
    this form); with more, or none, the whole queue.

    Text rather than ``--json``: 22.05 ignores every filter with ``--json``, and a
    job's JSON is 3.4 KB (22.05) to 7.5 KB (24.11) against ~130 bytes for its line
    (B4 in bench/RESULTS.md).
    """
    if not _MARK_RE.match(mark):
        raise ValueError("the poll's mark must be 16-64 lowercase hex digits")
    ids = [validate_job_id(j) for j in job_ids]
    first, *middle, last = SQUEUE_POLL_FIELDS
    fields = [f"{first}:0|{mark}|", *(f"{name}:0|" for name in middle), f"{last}:0|{mark}"]
    argv = ["env", SLURM_TIME_FORMAT_ENV, "SLURM_BITSTR_LEN=0", "squeue", "--noheader", "--all",
            "--states=all", f"--Format={','.join(fields)}"]
    if ids and len(ids) <= MAX_FILTERED_JOBS:
        argv.append(f"--jobs={','.join(ids)}")
    return render(argv)


def build_sacct_jobs(job_ids: Iterable[str]) -> str:
    """One ``sacct -P`` of the given jobs' allocations, all users, epoch times.

    ``-P`` rather than ``--json``: 22.05's JSON reports exit code 0 for failed
    jobs (the text ``ExitCode`` is right) and is ~2x slower.
    """
    ids = [validate_job_id(j) for j in job_ids]
    return render(
        [
            "env",
            SLURM_TIME_FORMAT_ENV,
            "sacct",
            "--allusers",
            "--allocations",
            "--parsable2",
            "--noheader",
            f"--jobs={','.join(ids)}",
            f"--format={','.join(SACCT_PARSABLE_FIELDS)}",
        ]
    )


def build_sacct_window(
    seconds_back: int,
    *,
    accounts: Sequence[str] | None = None,
    terminal_only: bool = False,
    fields: Sequence[str] = SACCT_PARSABLE_FIELDS,
    until_seconds_back: int = 0,
) -> str:
    """``sacct -P`` of allocations (``-X``) from ``seconds_back`` to
    ``until_seconds_back`` seconds ago (default: now), all users, times as epoch
    seconds. The window is relative (``now-N``) so the login node's time zone never
    matters.

    What the window selects depends on the states (sacct(1), ``--endtime``; slurmdbd
    ``_state_time_string``): with ``terminal_only`` (``--state`` of end states) the
    jobs in those states whose *end* falls in the window; without, every job
    eligible or running at some point of it. Callers filter by end time again."""
    start = max(int(seconds_back), 1)
    end = max(int(until_seconds_back), 0)
    if end >= start:
        raise ValueError(f"empty sacct window: from now-{start} to now-{end}")
    argv = [
        "env",
        SLURM_TIME_FORMAT_ENV,
        "sacct",
        "--allusers",
        "--allocations",
        "--parsable2",
        "--noheader",
        f"--starttime=now-{start}",
        f"--endtime=now-{end}" if end else "--endtime=now",
        f"--format={','.join(fields)}",
    ]
    if terminal_only:
        argv.append(f"--state={','.join(TERMINAL_STATE_CODES)}")
    if accounts:
        argv.append(f"--accounts={','.join(_checked_accounts(accounts))}")
    return render(argv)


def _checked_accounts(accounts: Sequence[str]) -> Sequence[str]:
    """Account names that a comma list carries unchanged (else ValueError)."""
    for account in accounts:
        if not account or "," in account or "\x00" in account:
            raise ValueError(f"invalid account name {account!r}")
    return accounts


#: Fields of :func:`build_find_queue`, ``|``-separated, job name last.
QUEUE_TEXT_FORMAT = "%i|%u|%V|%a|%j"


def build_find_queue(accounts: Sequence[str] | None = None) -> str:
    """Every job the controller holds (all states), as ``id|user|submit|account|name``;
    only those of ``accounts`` when given (``--account``)."""
    argv = [
        "env",
        SLURM_TIME_FORMAT_ENV,
        "squeue",
        "--noheader",
        "--all",
        "--states=all",
        f"--format={QUEUE_TEXT_FORMAT}",
    ]
    if accounts:
        argv.append(f"--account={','.join(_checked_accounts(accounts))}")
    return render(argv)


def build_cancel(job_id: str) -> str:
    """``scancel`` of one job."""
    return render(["scancel", validate_job_id(job_id)])


def build_tail(path: str, tail: int) -> str:
    """The last ``tail`` bytes of a file (home-relative unless absolute)."""
    return render(["tail", "-c", str(max(int(tail), 0)), "--", HomePath(path)])


def build_discover_partitions() -> str:
    """Partitions, one line each."""
    return render(["scontrol", "--oneliner", "show", "partition"])


def build_discover_nodes() -> str:
    """Nodes, one line each."""
    return render(["scontrol", "--oneliner", "show", "node"])
