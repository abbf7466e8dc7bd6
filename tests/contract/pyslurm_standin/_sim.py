"""The simulated scheduler behind the pyslurm stand-in."""

from __future__ import annotations

import collections
import contextlib
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
    subst = {"%j": str(job.id), "%u": job.user_name, "%%": "%", "%x": job.name}
    path = re.sub(r"%[%jux]", lambda m: subst[m.group(0)], pattern)
    return path if os.path.isabs(path) else os.path.join(job.working_directory, path)


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

    def submit(self, job: SimJob, uid: int | None) -> int:
        with self.lock:
            self.count("submit")
            part = self._check(job, uid)
            job.partition = part.name
            job.id = self.next_id
            self.next_id += 1
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
            for job in self.jobs.values():
                if job.state == "PENDING" and now - job.submit_mono >= self.start_delay:
                    self._start(job)
                if job.state == "RUNNING":
                    self._check_running(job, now)

    def _start(self, job: SimJob) -> None:
        self.spool.mkdir(exist_ok=True)
        script = self.spool / f"job{job.id}.sh"
        script.write_text(job.script)
        script.chmod(0o700)
        env = {**job.env, "SLURM_JOB_ID": str(job.id), "SLURM_JOB_NAME": job.name,
               "SLURM_JOB_ACCOUNT": job.account, "SLURM_JOB_PARTITION": job.partition,
               "SLURM_NNODES": str(job.nodes), "SLURM_NTASKS": str(job.ntasks),
               "SLURM_JOB_USER": job.user_name}
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
        with self.lock:
            self.count("cancel")
            self.tick()
            job = self.jobs.get(job_id)
            if job is None or self._purged(job):
                raise RPCError(2017, "Invalid job id specified")
            if job.state in TERMINAL:
                raise RPCError(2021, "Job/step already completing or completed")
            self._kill(job)
            self._end(job, "CANCELLED", 0, signal.SIGKILL)

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
