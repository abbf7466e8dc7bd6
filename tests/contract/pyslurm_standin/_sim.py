"""The simulated scheduler behind the pyslurm stand-in."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})


class PyslurmError(Exception):
    """Base of pyslurm errors."""


class RPCError(PyslurmError):
    """A failed Slurm RPC: ``errno`` and ``msg`` as in pyslurm."""

    def __init__(self, errno: int = -1, msg: str | None = None) -> None:
        self.errno = errno
        self.msg = msg or f"Slurm error {errno}"
        super().__init__(self.msg)


@dataclass
class SimPartition:
    name: str
    cpus: int = 4
    gpus: int = 0
    memory_mb: int = 8192
    nodes: int = 1
    max_time: int | str = "UNLIMITED"
    default: bool = False


@dataclass
class SimJob:
    id: int
    name: str
    account: str
    user_name: str
    partition: str
    comment: str | None
    working_directory: str
    standard_output: str
    standard_error: str
    script: str
    env: dict[str, str]
    time_limit: int
    nodes: int
    ntasks: int
    cpus_per_task: int
    gpus_per_node: int
    memory_mb: int
    submit_time: int = field(default_factory=lambda: int(time.time()))
    submit_mono: float = field(default_factory=time.monotonic)
    start_time: int = 0
    start_mono: float = 0.0
    end_time: int = 0
    end_mono: float = 0.0
    state: str = "PENDING"
    state_reason: str = "None"
    exit_code: int = 0
    exit_code_signal: int = 0
    proc: subprocess.Popen[bytes] | None = None
    #: job arrays, as slurmctld keeps them: the array's master id (0: not an
    #: array), this record's task (None for the record of the waiting tasks), the
    #: waiting tasks that record stands for, and the ``%max`` throttle (0: none)
    array_id: int = 0
    array_task_id: int | None = None
    array_pending: list[int] = field(default_factory=list)
    array_max: int = 0
    #: ``standard_output``/``standard_error`` as submitted (an array task's paths
    #: are expanded when it starts: ``%j`` is then the task's own job id)
    output_pattern: str = ""
    error_pattern: str = ""

    @property
    def elapsed(self) -> int:
        if not self.start_time:
            return 0
        end = self.end_mono if self.end_time else time.monotonic()
        return int(end - self.start_mono)

    def tres(self) -> dict[str, float]:
        cpus = self.ntasks * self.cpus_per_task
        out = {"cpu": cpus, "mem": self.memory_mb * self.nodes, "node": self.nodes,
               "billing": cpus}
        if self.gpus_per_node:
            out["gres/gpu"] = self.gpus_per_node * self.nodes
        return out


def _expand(pattern: str, job: SimJob) -> str:
    subst = {"%j": str(job.id), "%u": job.user_name, "%%": "%", "%x": job.name,
             "%A": str(job.array_id or job.id),
             "%a": str(job.array_task_id if job.array_task_id is not None else 4294967294)}
    path = re.sub(r"%[%juxAa]", lambda m: subst[m.group(0)], pattern)
    return path if os.path.isabs(path) else os.path.join(job.working_directory, path)


def parse_array(text: str) -> tuple[list[int], int]:
    """sbatch's ``--array`` syntax (``0-15:2%4``, ``1,3,5``) → (task ids, throttle);
    ValueError as libslurm refuses it (ESLURM_BAD_TASK_COUNT)."""
    body, _, limit = text.partition("%")
    tasks: set[int] = set()
    for part in body.split(","):
        rng, _, step = part.partition(":")
        first, _, last = rng.partition("-")
        lo, hi = int(first), int(last or first)
        if lo < 0 or hi < lo or (step and int(step) < 1):
            raise ValueError(text)
        tasks.update(range(lo, hi + 1, int(step or 1)))
    return sorted(tasks), int(limit or 0)


def range_text(tasks: list[int]) -> str:
    """``[2, 3, 4, 7]`` → ``2-4,7`` (how slurmctld shows waiting tasks)."""
    runs: list[list[int]] = []
    for task in sorted(tasks):
        if runs and runs[-1][1] + 1 == task:
            runs[-1][1] = task
        else:
            runs.append([task, task])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def hex_bitmap(tasks: list[int]) -> str:
    """``[2, 3, 4, 5]`` → ``0x3C`` (how slurmdbd stores an array's waiting tasks)."""
    return hex(sum(1 << t for t in tasks)).upper().replace("0X", "0x")


class Controller:
    """slurmctld + slurmdbd in one object; advances on every API call."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.partitions: dict[str, SimPartition] = {}
        self.jobs: dict[int, SimJob] = {}
        self.next_id = 1000
        self.seconds_per_minute = 60.0
        self.start_delay = 0.2
        self.db_lag = 0.3
        self.min_job_age = 3.0
        self.calls: collections.Counter[str] = collections.Counter()
        self.spool = Path(tempfile.mkdtemp(prefix="pyslurm-standin-"))

    def configure(self, partitions: list[SimPartition], **knobs: float) -> None:
        """Set the partitions and timing knobs (test hook)."""
        with self.lock:
            self.partitions = {p.name: p for p in partitions}
            for key, value in knobs.items():
                setattr(self, key, value)

    def count(self, kind: str) -> None:
        self.calls[kind] += 1

    # --- submission

    def submit(self, job: SimJob, uid: int | None, array: str | None = None) -> int:
        with self.lock:
            self.count("submit")
            part = self._check(job, uid)
            if array:
                try:
                    job.array_pending, job.array_max = parse_array(array)
                except ValueError:
                    raise RPCError(2116, "Job array index too large. Job not submitted.") from None
            job.partition = part.name
            job.id = self.next_id
            self.next_id += 1
            job.output_pattern, job.error_pattern = job.standard_output, job.standard_error
            if array:  # one record, the array's, standing for every task until they start
                job.array_id = job.id
            else:
                job.standard_output = _expand(job.standard_output, job)
                job.standard_error = _expand(job.standard_error, job)
            self.jobs[job.id] = job
            return job.id

    def _check(self, job: SimJob, uid: int | None) -> SimPartition:
        if uid is not None and os.getuid() not in (0, uid):
            raise RPCError(2002, "Access/permission denied")
        name = job.partition or next((p.name for p in self.partitions.values() if p.default), "")
        part = self.partitions.get(name)
        if part is None:
            raise RPCError(2000, "Invalid partition name specified")
        if isinstance(part.max_time, int) and job.time_limit > part.max_time:
            raise RPCError(2051, "Requested time limit is invalid (missing or exceeds some limit)")
        if job.gpus_per_node > part.gpus or job.nodes > part.nodes:
            raise RPCError(2014, "Requested node configuration is not available")
        return part

    # --- advancing

    def tick(self) -> None:
        with self.lock:
            now = time.monotonic()
            for job in list(self.jobs.values()):
                if job.state == "RUNNING":
                    self._check_running(job, now)
            for job in list(self.jobs.values()):
                if job.state != "PENDING" or now - job.submit_mono < self.start_delay:
                    continue
                if job.array_pending:
                    self._start_array_tasks(job)
                else:
                    self._start(job)

    def _start_array_tasks(self, meta: SimJob) -> None:
        """Start waiting tasks up to the throttle, as slurmctld does: a starting task
        is split off into a record of its own with a new job id, except the last
        one, which takes over the array's record (and its id)."""
        running = sum(1 for j in self.jobs.values() if j.array_id == meta.array_id and j.state == "RUNNING")
        while meta.array_pending and (not meta.array_max or running < meta.array_max):
            task = meta.array_pending.pop(0)
            if meta.array_pending:
                record = dataclasses.replace(meta, id=self.next_id, array_task_id=task, array_pending=[],
                                             env=dict(meta.env))
                self.next_id += 1
                self.jobs[record.id] = record
            else:
                record = meta
                record.array_task_id = task
            self._start(record)
            running += 1
        meta.state_reason = "JobArrayTaskLimit" if meta.array_pending else "None"

    def _start(self, job: SimJob) -> None:
        self.spool.mkdir(exist_ok=True)
        script = self.spool / f"job{job.id}.sh"
        script.write_text(job.script)
        script.chmod(0o700)
        env = {**job.env, "SLURM_JOB_ID": str(job.id), "SLURM_JOB_NAME": job.name,
               "SLURM_JOB_ACCOUNT": job.account, "SLURM_JOB_PARTITION": job.partition,
               "SLURM_NNODES": str(job.nodes), "SLURM_NTASKS": str(job.ntasks),
               "SLURM_JOB_USER": job.user_name}
        if job.array_id:
            env.update(SLURM_ARRAY_JOB_ID=str(job.array_id), SLURM_ARRAY_TASK_ID=str(job.array_task_id))
            job.standard_output = _expand(job.output_pattern, job)
            job.standard_error = _expand(job.error_pattern, job)
        job.start_time, job.start_mono, job.state = int(time.time()), time.monotonic(), "RUNNING"
        try:
            with open(job.standard_output, "ab") as out, open(job.standard_error, "ab") as err:
                job.proc = subprocess.Popen(
                    [str(script)], cwd=job.working_directory, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, start_new_session=True)
        except OSError as exc:
            job.state_reason = f"launch failed: {exc}"
            self._end(job, "FAILED", 1, 0)

    def _check_running(self, job: SimJob, now: float) -> None:
        assert job.proc is not None
        rc = job.proc.poll()
        if rc is not None:
            if rc == 0:
                self._end(job, "COMPLETED", 0, 0)
            else:
                self._end(job, "FAILED", max(rc, 0), -rc if rc < 0 else 0)
        elif now - job.start_mono >= job.time_limit * self.seconds_per_minute:
            self._kill(job)
            self._end(job, "TIMEOUT", 0, signal.SIGTERM)

    def _kill(self, job: SimJob) -> None:
        if job.proc is not None and job.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()

    def _end(self, job: SimJob, state: str, code: int, sig: int) -> None:
        job.state, job.exit_code, job.exit_code_signal = state, code, sig
        job.end_time, job.end_mono = int(time.time()), time.monotonic()

    def cancel(self, job_id: int) -> None:
        """``slurm_kill_job``: a job's own id ends that record; the id of an array
        whose record is still known ends the whole array — the record of its
        waiting tasks first, then every started task (slurmctld's
        ``job_str_signal``, which ``slurm_kill_job`` goes through)."""
        with self.lock:
            self.count("cancel")
            self.tick()
            job = self.jobs.get(job_id)
            if job is None or self._purged(job):
                raise RPCError(2017, "Invalid job id specified")
            members = [j for j in self.jobs.values() if job.array_id == job_id and j.array_id == job_id]
            live = [j for j in sorted(members or [job], key=lambda j: j.id != job_id) if j.state not in TERMINAL]
            if not live:
                raise RPCError(2021, "Job/step already completing or completed")
            for record in live:
                self._kill(record)
                self._end(record, "CANCELLED", 0, signal.SIGKILL)

    # --- views

    def _purged(self, job: SimJob) -> bool:
        return job.state in TERMINAL and time.monotonic() - job.end_mono > self.min_job_age

    def queue(self, kind: str) -> list[SimJob]:
        """Jobs slurmctld still knows."""
        with self.lock:
            self.count(kind)
            self.tick()
            return [j for j in self.jobs.values() if not self._purged(j)]

    def accounting(self, kind: str) -> list[tuple[SimJob, str]]:
        """(job, state as slurmdbd knows it): ends arrive ``db_lag`` seconds late."""
        with self.lock:
            self.count(kind)
            self.tick()
            now = time.monotonic()
            return [(j, "RUNNING" if j.state in TERMINAL and now - j.end_mono < self.db_lag
                     else j.state) for j in self.jobs.values()]

    def shutdown(self) -> None:
        """Kill every job (test hook)."""
        with self.lock:
            for job in self.jobs.values():
                self._kill(job)
            self.jobs.clear()
            self.calls.clear()
            shutil.rmtree(self.spool, ignore_errors=True)


def user_name(uid: int | str | None) -> str:
    if uid is None:
        return pwd.getpwuid(os.getuid()).pw_name
    return pwd.getpwuid(uid).pw_name if isinstance(uid, int) else uid


CONTROLLER = Controller()
