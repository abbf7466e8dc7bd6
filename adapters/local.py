"""The ``local`` adapter: runs jobs as subprocesses on the broker's own machine.

**Development and demos only.** Every job runs as the broker's own OS user, with
the broker's privileges, whatever ``JobSpec.username`` says (the username is only
recorded for accounting); ``runs_as_broker_user`` is True so the core refuses this
adapter in production mode. Nothing isolates jobs from each other or from the
broker's data directory.

How it works: each job gets a directory ``<data_dir>/local-jobs/<job_id>/``
holding the script, ``spec.json`` (what to run, the job's TRES), ``state.json``
(kept by the supervisor), ``stdout``, ``stderr``. :meth:`LocalAdapter.submit`
hands the job to the data directory's one long-lived, detached supervisor
(:mod:`adapters.local_supervisor`, started on demand, exits when idle) over a
Unix socket; it runs the script in its own process group, enforces the time
limit and cancels, and records the end. No process starts per job on the submit
path but the job itself. Jobs outlive the broker process; a new adapter on the
same data directory sees them (a supervisor that vanished, e.g. after a reboot,
makes its jobs ``FAILED`` with raw state ``NODE_FAIL``). Jobs start at
once: there is no queue, and CPU/memory counts are not enforced, only checked
against the partition and charged.

Settings (the cluster definition's ``connection`` table), all optional:

``partitions``
    list of ``{name, cpus, gpus, memory_mb, max_time_minutes, default, nodes}``;
    default: one partition ``local`` (default) with ``os.cpu_count()`` CPUs,
    ``gpus`` fake GPUs and the memory of ``/proc/meminfo``.
``gpus``
    fake GPUs of the default partition (default 0); jobs see
    ``SLURM_GPUS_ON_NODE`` and are charged for them.
``max_time_minutes``
    time limit cap for every partition (default: none).
``enforce_limits``
    reject jobs asking more nodes/CPUs/GPUs/memory than the partition has
    (default true), like Slurm does.
``kill_grace_seconds``
    between SIGTERM and SIGKILL at cancel/time limit (default 5; Slurm's KillWait).
``time_scale``
    **tests only**: seconds per minute of time limit (default 60). The contract
    suite sets 1 so a "1 minute" limit fires after one second.
``python``
    interpreter for the supervisor (default: the broker's ``sys.executable``).
``supervisor_idle_seconds``
    the supervisor exits after this long without jobs or requests (default 30);
    the next submission starts it again.

Job ids are increasing integers (as strings) from a counter file under an
``fcntl.flock`` lock: unique across threads and processes sharing the data dir.

Arrays (``JobSpec.array``) work as in Slurm: the array gets a job id of its own
(a directory holding the spec and ``array.json``, which task runs under which id),
each task runs as a job of its own id with ``SLURM_ARRAY_JOB_ID``/``_TASK_ID``
set, tasks are named ``<array id>_<task>`` and at most ``%max`` run at once. The
adapter starts the next waiting tasks when the array is submitted and whenever it
is polled (there is no scheduler loop of its own: a waiting task starts within
one tracker cycle of a slot freeing up).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters import local_supervisor as sup
from adapters.slurm_common.arrays import task_key
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterAdapter,
    Health,
    JobSpec,
    JobState,
    JobStatus,
    PartitionInfo,
    SchedulerJobRef,
    StartEstimate,
    SubmitRejected,
    UsageRecord,
    refuse_directives,
    reject_unknown_settings,
)
from broker.directives import parse_array

__all__ = ["LocalAdapter"]

#: the ``connection`` keys of the module docstring (anything else is refused)
SETTINGS_KEYS = ("partitions", "gpus", "max_time_minutes", "enforce_limits", "kill_grace_seconds",
                 "time_scale", "python", "supervisor_idle_seconds")

JOBS_DIR = "local-jobs"
COUNTER_FILE = ".next-job-id"
#: in an array's directory: which task runs under which job id, which were cancelled
ARRAY_FILE = "array.json"
ARRAY_LOCK = "array.lock"
_TASK_REF = re.compile(r"^(\d+)_(\d+)$")
LAUNCH_TIMEOUT = 30.0
_SPEC_CACHE_MAX = 10_000

_RAW_TO_STATE = {
    "PENDING": JobState.PENDING,
    sup.RAW_RUNNING: JobState.RUNNING,
    sup.RAW_COMPLETED: JobState.COMPLETED,
    sup.RAW_FAILED: JobState.FAILED,
    sup.RAW_CANCELLED: JobState.CANCELLED,
    sup.RAW_TIMEOUT: JobState.TIMEOUT,
    sup.RAW_NODE_FAIL: JobState.FAILED,
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: broker environment variables a job inherits; everything else (secrets!) is dropped
_PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME", "SHELL")


@dataclass(frozen=True)
class _Partition:
    name: str
    cpus: int
    gpus: int
    memory_mb: int
    nodes: int
    max_time_minutes: int | None
    default: bool

    def info(self) -> PartitionInfo:
        tres: dict[str, float] = {"cpu": self.cpus * self.nodes, "mem": self.memory_mb * self.nodes,
                                  "node": self.nodes, "billing": self.cpus * self.nodes}
        if self.gpus:
            tres["gres/gpu"] = self.gpus * self.nodes
        return PartitionInfo(name=self.name, default=self.default, nodes=self.nodes,
                             cpus_per_node=self.cpus, gpus_per_node=self.gpus,
                             memory_per_node_mb=self.memory_mb,
                             max_time_minutes=self.max_time_minutes, tres=tres)


def _meminfo_mb() -> int:
    """Total memory of this machine in MB (0 if /proc/meminfo is unreadable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _int_setting(value: Any, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise AdapterConfigError(f"local adapter: {what} must be an integer, got {value!r}")
    if value < minimum:
        raise AdapterConfigError(f"local adapter: {what} must be >= {minimum}, got {value!r}")
    return int(value)


def _float_setting(settings: Mapping[str, Any], key: str, default: float) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise AdapterConfigError(f"local adapter: {key} must be a positive number, got {value!r}")
    return float(value)


def _parse_partitions(settings: Mapping[str, Any]) -> list[_Partition]:
    cap = settings.get("max_time_minutes")
    cap = None if cap is None else _int_setting(cap, "max_time_minutes", minimum=1)
    raw = settings.get("partitions")
    if raw is None:
        gpus = _int_setting(settings.get("gpus", 0), "gpus")
        raw = [{"name": "local", "default": True, "gpus": gpus}]
    if not isinstance(raw, list) or not raw:
        raise AdapterConfigError("local adapter: partitions must be a non-empty list")
    parts = [_parse_partition(p, cap) for p in raw]
    if len({p.name for p in parts}) != len(parts):
        raise AdapterConfigError("local adapter: partition names must be unique")
    if not any(p.default for p in parts):
        first = parts[0]
        parts[0] = _Partition(first.name, first.cpus, first.gpus, first.memory_mb, first.nodes,
                              first.max_time_minutes, True)
    return parts


def _parse_partition(raw: Any, cap: int | None) -> _Partition:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise AdapterConfigError(f"local adapter: bad partition entry {raw!r} (needs a name)")
    name = raw["name"]
    max_time = raw.get("max_time_minutes")
    if max_time is not None:
        max_time = _int_setting(max_time, f"{name}.max_time_minutes", minimum=1)
    if cap is not None:
        max_time = cap if max_time is None else min(max_time, cap)
    return _Partition(
        name=name,
        cpus=_int_setting(raw.get("cpus", os.cpu_count() or 1), f"{name}.cpus", minimum=1),
        gpus=_int_setting(raw.get("gpus", 0), f"{name}.gpus"),
        memory_mb=_int_setting(raw.get("memory_mb", _meminfo_mb()), f"{name}.memory_mb"),
        nodes=_int_setting(raw.get("nodes", 1), f"{name}.nodes", minimum=1),
        max_time_minutes=max_time,
        default=bool(raw.get("default", False)),
    )


def _ts(value: Any) -> datetime | None:
    """A UTC datetime from an epoch float in a record (None stays None)."""
    return None if value is None else datetime.fromtimestamp(float(value), UTC)


class LocalAdapter(ClusterAdapter):
    """Runs jobs as detached local subprocesses; see the module docstring."""

    runs_as_broker_user = True

    def __init__(self, name: str, settings: Mapping[str, Any], *, data_dir: str) -> None:
        super().__init__(name, settings, data_dir=data_dir)
        reject_unknown_settings("local", self.settings, SETTINGS_KEYS)
        self._partitions = _parse_partitions(self.settings)
        self._time_scale = _float_setting(self.settings, "time_scale", 60.0)
        self._grace = _float_setting(self.settings, "kill_grace_seconds", 5.0)
        self._enforce = bool(self.settings.get("enforce_limits", True))
        self._python = str(self.settings.get("python") or sys.executable)
        self._idle = _float_setting(self.settings, "supervisor_idle_seconds",
                                    sup.DEFAULT_IDLE_SECONDS)
        self._root = Path(data_dir) / JOBS_DIR
        self._id_lock = threading.Lock()
        self._spec_cache: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ submit

    def submit(self, spec: JobSpec) -> SchedulerJobRef:
        """Start ``spec`` now under a detached supervisor; returns once it runs."""
        part = self._partition_for(spec)
        self._check_request(spec, part)
        env_extra = self._checked_environment(spec.environment)
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            job_id, jobdir = self._new_job_dir()
            record = self._write_job(job_id, jobdir, spec, part, env_extra)
        except OSError as exc:
            raise AdapterError(f"local adapter: cannot create the job: {exc}",
                               transient=True) from exc
        if spec.array:  # the array's own directory: tasks start from it, each under an id of its own
            sup.atomic_write_json(jobdir / ARRAY_FILE, {"started": {}, "cancelled": []})
            sup.write_tag_index(jobdir, record)
            self._advance(job_id)
        else:
            self._launch(job_id, jobdir)
        return SchedulerJobRef(job_id=job_id, username=spec.username, tag=spec.tag,
                               submit_time=_ts(record["submit_time"]))

    def _partition_for(self, spec: JobSpec) -> _Partition:
        if spec.partition is None:
            return next(p for p in self._partitions if p.default)
        for p in self._partitions:
            if p.name == spec.partition:
                return p
        known = ", ".join(p.name for p in self._partitions)
        raise SubmitRejected(f"invalid partition {spec.partition!r} (this cluster has: {known})",
                             code="invalid_partition")

    def _check_request(self, spec: JobSpec, part: _Partition) -> None:
        refuse_directives(spec.script)
        if spec.array:
            try:
                parse_array(spec.array)
            except ValueError as exc:
                raise SubmitRejected(f"invalid --array {spec.array!r}: {exc}", code="invalid_request") from exc
        cannot = [name for name, value in (("dependency", spec.dependency),
                                           ("constraint", spec.constraint), ("mail", spec.mail_type or spec.mail_user),
                                           ("GPU type", spec.gpu_type)) if value]
        if cannot:  # refused, never dropped: the job would not be what was asked
            raise SubmitRejected(f"the local cluster cannot honour {', '.join(cannot)}", code="unsupported_request")
        if spec.time_limit_minutes < 1:
            raise SubmitRejected("time limit must be at least 1 minute", code="invalid_time_limit")
        if part.max_time_minutes is not None and spec.time_limit_minutes > part.max_time_minutes:
            raise SubmitRejected(f"time limit {spec.time_limit_minutes} min exceeds the partition "
                                 f"limit of {part.max_time_minutes} min", code="invalid_time_limit")
        if min(spec.nodes, spec.ntasks_per_node, spec.cpus_per_task) < 1 or spec.gpus_per_node < 0:
            raise SubmitRejected("nodes, tasks and cpus must be >= 1, gpus >= 0",
                                 code="invalid_request")
        if not self._enforce:
            return
        asks = {"nodes": (spec.nodes, part.nodes),
                "cpus per node": (spec.ntasks_per_node * spec.cpus_per_task, part.cpus),
                "gpus per node": (spec.gpus_per_node, part.gpus),
                "memory per node (MB)": (spec.memory_per_node_mb or 0, part.memory_mb)}
        too_big = [f"{what} {have} > {limit}"
                   for what, (have, limit) in asks.items() if have > limit]
        if too_big:
            raise SubmitRejected(f"requested node configuration is not available in partition "
                                 f"{part.name!r}: {'; '.join(too_big)}", code="invalid_request")

    @staticmethod
    def _checked_environment(env: Mapping[str, str]) -> dict[str, str]:
        bad = [k for k, v in env.items()
               if not _ENV_NAME.fullmatch(k) or not isinstance(v, str) or "\0" in v]
        if bad:
            raise SubmitRejected(f"invalid environment variables: {', '.join(map(repr, bad))}",
                                 code="invalid_environment")
        return dict(env)

    def _new_job_dir(self) -> tuple[str, Path]:
        """Allocate the next job id (flock'ed counter file) and create its directory.

        ``mkdir`` is what makes an id unique (across threads and processes); the
        counter only saves the search. It is overwritten in place, fixed width, not
        fsynced: after a host crash every local job is gone anyway and an id whose
        directory survived is skipped."""
        with self._id_lock:
            fd = os.open(self._root / COUNTER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                next_id = int(text) if text.isdigit() else 1
                while True:
                    jobdir = self._root / str(next_id)
                    try:
                        jobdir.mkdir(mode=0o700)
                        break
                    except FileExistsError:
                        next_id += 1
                os.pwrite(fd, str(next_id + 1).rjust(20).encode("ascii"), 0)
            finally:
                os.close(fd)
        return str(next_id), jobdir

    def _write_job(self, job_id: str, jobdir: Path, spec: JobSpec, part: _Partition,
                   env_extra: dict[str, str]) -> dict[str, Any]:
        script = jobdir / sup.SCRIPT_FILE
        script.write_text(spec.script, encoding="utf-8")
        script.chmod(0o700)
        argv = [str(script)] if spec.script.startswith("#!") else ["/bin/sh", str(script)]
        wd = spec.working_directory
        cwd = wd if wd and os.path.isdir(wd) else str(jobdir)
        record: dict[str, Any] = {
            "job_id": job_id, "tag": spec.tag, "name": spec.name, "username": spec.username,
            "account": spec.account, "partition": part.name, "submit_time": time.time(),
            "time_limit_minutes": spec.time_limit_minutes,
            "time_limit_seconds": spec.time_limit_minutes * self._time_scale,
            "kill_grace_seconds": self._grace, "argv": argv, "cwd": cwd,
            "env": self._job_environment(job_id, spec, part, cwd, env_extra),
            "alloc_tres": self._alloc_tres(spec, part),
        }
        if spec.array:
            array = parse_array(spec.array)
            record["array"] = {"text": array.text, "tasks": list(array.task_ids), "max_running": array.max_running}
        sup.atomic_write_json(jobdir / sup.SPEC_FILE, record)  # not fsynced: see the module doc
        return record

    @staticmethod
    def _alloc_tres(spec: JobSpec, part: _Partition) -> dict[str, float]:
        tasks = spec.ntasks if spec.ntasks is not None else spec.nodes * spec.ntasks_per_node
        cpus = tasks * spec.cpus_per_task
        per_node = spec.memory_per_node_mb
        if per_node is None:  # Slurm's DefMemPerCPU-like share of the node
            per_node = part.memory_mb * spec.ntasks_per_node * spec.cpus_per_task // part.cpus
        gpus = spec.nodes * spec.gpus_per_node
        if spec.exclusive:  # whole nodes, like Slurm's --exclusive
            cpus, per_node, gpus = spec.nodes * part.cpus, part.memory_mb, spec.nodes * part.gpus
        return {"cpu": cpus, "node": spec.nodes, "gres/gpu": gpus, "mem": spec.nodes * per_node, "billing": cpus}

    @staticmethod
    def _job_environment(job_id: str, spec: JobSpec, part: _Partition, cwd: str,
                         extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        env.setdefault("PATH", os.defpath)
        env.update(extra)
        env.update({
            "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": spec.name, "SLURM_JOB_ACCOUNT": spec.account,
            "SLURM_JOB_PARTITION": part.name, "SLURM_NNODES": str(spec.nodes),
            "SLURM_NTASKS": str(spec.nodes * spec.ntasks_per_node),
            "SLURM_CPUS_PER_TASK": str(spec.cpus_per_task),
            "SLURM_GPUS_ON_NODE": str(spec.gpus_per_node), "SLURM_SUBMIT_DIR": cwd,
            "SLURM_JOB_USER": spec.username, "AIFA_BROKER_TAG": spec.tag,
        })
        return env

    def _launch(self, job_id: str, jobdir: Path) -> None:
        """Ask the supervisor to start the job; it answers once the job runs.

        The supervisor is started when there is none (first job, after it went
        idle or was killed). A request that meets a supervisor just going away
        is repeated: the job directory's claim file says whether it was started."""
        for _ in range(3):
            try:
                reply = self._ask(f"start {job_id}")
            except ConnectionRefusedError:
                self._start_supervisor()
                continue
            except ConnectionResetError:
                reply = ""
            except TimeoutError as exc:
                raise AdapterError(f"local adapter: no start confirmation for job {job_id}",
                                   transient=True, code="submit_outcome_unknown") from exc
            except OSError as exc:
                raise AdapterError(f"local adapter: cannot reach the supervisor: {exc}",
                                   transient=True) from exc
            if reply == "ok":
                return
            if reply:
                raise AdapterError(f"local adapter: job {job_id} did not start: {reply[:500]}",
                                   transient=True)
            if (jobdir / sup.STARTED_FILE).exists():
                if (jobdir / sup.STATE_FILE).exists():
                    return
                raise AdapterError(f"local adapter: no start confirmation for job {job_id}",
                                   transient=True, code="submit_outcome_unknown")
        raise AdapterError("local adapter: the supervisor does not answer", transient=True)

    def _ask(self, line: str) -> str:
        """One request to the supervisor; its one-line answer ('' if it hung up)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(LAUNCH_TIMEOUT)
            conn.connect(sup.socket_address(self._root))
            conn.sendall(line.encode("utf-8") + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.decode("utf-8", "replace").strip()

    def _start_supervisor(self) -> None:
        """Start this data directory's supervisor (a no-op when one already listens)."""
        argv = [self._python, "-m", "adapters.local_supervisor", "--serve", str(self._root),
                "--idle", str(self._idle)]
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv, no shell
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True, close_fds=True, timeout=LAUNCH_TIMEOUT, check=False,
            )
        except (subprocess.TimeoutExpired, OSError) as exc:
            raise AdapterError(f"local adapter: cannot start the supervisor: {exc}",
                               transient=True) from exc
        if done.returncode != 0:
            detail = done.stderr.decode("utf-8", "replace").strip()[-500:]
            raise AdapterError(f"local adapter: the supervisor did not start: {detail}",
                               transient=True)

    # ------------------------------------------------------------------ arrays

    @contextlib.contextmanager
    def _array_locked(self, array_id: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """The array's spec and ``array.json`` under its lock; ``array.json`` is
        written back when the block ends."""
        jobdir = self._root / array_id
        fd = os.open(jobdir / ARRAY_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            spec = self._spec(array_id) or {}
            state = sup.read_json(jobdir / ARRAY_FILE) or {"started": {}, "cancelled": []}
            yield spec, state
            sup.atomic_write_json(jobdir / ARRAY_FILE, state)
        finally:
            os.close(fd)

    def _array_spec(self, job_id: str) -> dict[str, Any] | None:
        spec = self._spec(job_id)
        return spec if spec is not None and isinstance(spec.get("array"), dict) else None

    def _advance(self, array_id: str) -> None:
        """Start waiting tasks while fewer than ``%max`` run (none once cancelled)."""
        with self._array_locked(array_id) as (spec, state):
            if not spec or (self._root / array_id / sup.CANCEL_FILE).exists():
                return
            started: dict[str, str] = state["started"]
            waiting = [t for t in spec["array"]["tasks"]
                       if str(t) not in started and t not in state["cancelled"]]
            limit = spec["array"].get("max_running") or len(spec["array"]["tasks"])
            running = sum(1 for raw in started.values()
                          if (st := self._state(raw)) is None or st.get("state") not in sup.TERMINAL_RAW)
            for task in waiting[:max(0, limit - running)]:
                raw_id, taskdir = self._new_job_dir()
                env = {**spec["env"], "SLURM_JOB_ID": raw_id, "SLURM_ARRAY_JOB_ID": array_id,
                       "SLURM_ARRAY_TASK_ID": str(task),
                       "SLURM_ARRAY_TASK_COUNT": str(len(spec["array"]["tasks"])),
                       "SLURM_ARRAY_TASK_MIN": str(min(spec["array"]["tasks"])),
                       "SLURM_ARRAY_TASK_MAX": str(max(spec["array"]["tasks"]))}
                script = taskdir / sup.SCRIPT_FILE
                shutil.copyfile(self._root / array_id / sup.SCRIPT_FILE, script)
                script.chmod(0o700)
                argv = [str(script)] if spec["argv"][0] != "/bin/sh" else ["/bin/sh", str(script)]
                cwd = spec["cwd"] if spec["cwd"] != str(self._root / array_id) else str(taskdir)
                record = {**{k: v for k, v in spec.items() if k != "array"}, "job_id": raw_id, "tag": None,
                          "array_job_id": array_id, "array_task_id": task, "argv": argv, "cwd": cwd,
                          "env": env, "submit_time": spec["submit_time"]}
                sup.atomic_write_json(taskdir / sup.SPEC_FILE, record)
                started[str(task)] = raw_id
                self._launch(raw_id, taskdir)

    def _task_statuses(self, array_id: str, tasks: Sequence[int] | None) -> list[JobStatus]:
        """Each task as ``<array id>_<task>``: its run's status, or waiting/cancelled."""
        self._advance(array_id)
        spec = self._array_spec(array_id)
        if spec is None:
            return []
        state = sup.read_json(self._root / array_id / ARRAY_FILE) or {"started": {}, "cancelled": []}
        whole_cancelled = (self._root / array_id / sup.CANCEL_FILE).exists()
        out = []
        for task in spec["array"]["tasks"] if tasks is None else tasks:
            key = task_key(array_id, task)
            raw_id = state["started"].get(str(task))
            if raw_id is not None:
                status = self._status(raw_id)
                if status is not None:
                    out.append(replace(status, job_id=key, array_task_id=task, tag=spec.get("tag")))
                continue
            if task not in spec["array"]["tasks"]:
                continue
            if whole_cancelled or task in state["cancelled"]:
                out.append(JobStatus(job_id=key, state=JobState.CANCELLED, raw_state=sup.RAW_CANCELLED, final=True,
                                     reason="cancelled before start", submit_time=_ts(spec.get("submit_time")),
                                     end_time=datetime.now(tz=UTC), elapsed_seconds=0,
                                     alloc_tres=dict(spec.get("alloc_tres", {})), tag=spec.get("tag"),
                                     array_task_id=task))
            else:
                out.append(JobStatus(job_id=key, state=JobState.PENDING, raw_state="PENDING",
                                     reason="JobArrayTaskLimit", submit_time=_ts(spec.get("submit_time")),
                                     tag=spec.get("tag"), array_task_id=task))
        return out

    def _task_run(self, ref_id: str) -> str | None:
        """The job id task ``<array id>_<task>`` runs under (None: not started)."""
        m = _TASK_REF.match(ref_id)
        if m is None or self._array_spec(m.group(1)) is None:
            return None
        state = sup.read_json(self._root / m.group(1) / ARRAY_FILE) or {}
        started = state.get("started") or {}
        return started.get(m.group(2))

    def _cancel_array(self, ref_id: str) -> bool:
        """Cancel a whole array (``<id>``) or one task (``<id>_<task>``); False if
        ``ref_id`` is no array."""
        m = _TASK_REF.match(ref_id)
        array_id, task = (m.group(1), int(m.group(2))) if m else (ref_id, None)
        if self._array_spec(array_id) is None:
            return False
        with self._array_locked(array_id) as (_spec, state):
            if task is None:
                (self._root / array_id / sup.CANCEL_FILE).touch()  # no further task starts
                runs = list(state["started"].values())
            else:
                if str(task) not in state["started"] and task not in state["cancelled"]:
                    state["cancelled"].append(task)
                runs = [state["started"][str(task)]] if str(task) in state["started"] else []
        for raw_id in runs:
            self.cancel(SchedulerJobRef(job_id=raw_id, username="", tag=None))
        return True

    # ------------------------------------------------------------------ reading records

    def _jobdir(self, job_id: str) -> Path | None:
        if not job_id.isdigit():
            return None
        path = self._root / job_id
        return path if path.is_dir() else None

    def _spec(self, job_id: str) -> dict[str, Any] | None:
        cached = self._spec_cache.get(job_id)
        if cached is None:
            jobdir = self._jobdir(job_id)
            cached = None if jobdir is None else sup.read_json(jobdir / sup.SPEC_FILE)
            if cached is not None:
                if len(self._spec_cache) >= _SPEC_CACHE_MAX:
                    self._spec_cache.clear()
                self._spec_cache[job_id] = cached
        return cached

    def _state(self, job_id: str) -> dict[str, Any] | None:
        """The job's state record, finalised here if its supervisor is gone."""
        jobdir = self._jobdir(job_id)
        state = None if jobdir is None else sup.read_json(jobdir / sup.STATE_FILE)
        if jobdir is None or state is None or state.get("state") in sup.TERMINAL_RAW:
            return state
        if sup.same_process_alive(state.get("supervisor_pid"), state.get("supervisor_start")):
            return state
        return self._finalise_lost(jobdir)

    @staticmethod
    def _finalise_lost(jobdir: Path) -> dict[str, Any] | None:
        """The supervisor is gone without writing an end: kill leftovers, record NODE_FAIL."""
        state = sup.read_json(jobdir / sup.STATE_FILE)  # it may have just finished
        if state is None or state.get("state") in sup.TERMINAL_RAW:
            return state
        if sup.same_process_alive(state.get("pid"), state.get("pid_start")):
            sup.kill_group(int(state["pid"]), signal.SIGKILL)
        state.update(state=sup.RAW_NODE_FAIL, end_time=time.time(), exit_code=None,
                     reason="the local supervisor vanished (broker host rebooted or it was killed)")
        sup.atomic_write_json(jobdir / sup.STATE_FILE, state)
        return state

    def _status(self, job_id: str) -> JobStatus | None:
        spec, state = self._spec(job_id), self._state(job_id)
        if spec is None or state is None:
            return None
        raw = str(state.get("state", "PENDING"))
        start, end = state.get("start_time"), state.get("end_time")
        elapsed = None
        if start is not None:
            elapsed = round((end if end is not None else time.time()) - float(start))
        final = raw in sup.TERMINAL_RAW
        return JobStatus(
            job_id=job_id, state=_RAW_TO_STATE.get(raw, JobState.UNKNOWN), raw_state=raw,
            final=final, exit_code=state.get("exit_code") if final else None,
            reason=state.get("reason"), submit_time=_ts(spec.get("submit_time")),
            start_time=_ts(start), end_time=_ts(end),
            elapsed_seconds=elapsed if elapsed is not None else (0 if final else None),
            alloc_tres=dict(spec.get("alloc_tres", {})), tag=spec.get("tag"),
        )

    # ------------------------------------------------------------------ interface

    def poll(self, refs: Sequence[SchedulerJobRef]) -> list[JobStatus]:
        """Read each job's state file; jobs this machine does not know are omitted.
        An array is answered per task (and its waiting tasks started when a slot is free)."""
        out: list[JobStatus] = []
        for ref in refs:
            if self._array_spec(ref.job_id) is not None:
                out += self._task_statuses(ref.job_id, ref.array_tasks)
                continue
            status = self._status(ref.job_id)
            if status is not None:
                out.append(status)
        return out

    def cancel(self, ref: SchedulerJobRef) -> None:
        """Ask the supervisor to cancel (file + request); finished jobs are left alone.
        ``<array id>`` cancels every task of an array, ``<array id>_<task>`` one."""
        if self._cancel_array(ref.job_id):
            return
        jobdir = self._jobdir(ref.job_id)
        if jobdir is None:
            raise AdapterError(f"local adapter: no job {ref.job_id!r}", code="not_found")
        state = self._state(ref.job_id)
        if state is not None and state.get("state") in sup.TERMINAL_RAW:
            return
        (jobdir / sup.CANCEL_FILE).touch()  # the supervisor also finds it within a second
        if state is not None and sup.same_process_alive(state.get("supervisor_pid"),
                                                        state.get("supervisor_start")):
            with contextlib.suppress(OSError):
                self._ask(f"cancel {ref.job_id}")

    def find_by_tag(
        self, tags: Sequence[str], *, since: datetime | None = None, accounts: Sequence[str] | None = None
    ) -> dict[str, SchedulerJobRef]:
        """Look the tags up in the ``by-tag`` index the supervisors maintain (one
        file per tag: ``accounts`` would narrow nothing)."""
        found: dict[str, SchedulerJobRef] = {}
        index = self._root / sup.TAG_INDEX_DIR
        for tag in tags:
            try:
                job_id = (index / sup.tag_index_name(tag)).read_text(encoding="ascii").strip()
            except (FileNotFoundError, NotADirectoryError):
                continue
            spec = self._spec(job_id)
            if spec is None or spec.get("tag") != tag:
                continue
            submitted = _ts(spec.get("submit_time"))
            if since is not None and submitted is not None and submitted < since:
                continue
            found[tag] = SchedulerJobRef(job_id=job_id, username=str(spec["username"]), tag=tag,
                                         submit_time=submitted, account=spec.get("account"))
        return found

    def _job_ids(self) -> Iterator[str]:
        try:
            entries = list(os.scandir(self._root))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.isdigit() and entry.is_dir():
                yield entry.name

    def usage(self, since: datetime, *, accounts: Sequence[str] | None = None,
              until: datetime | None = None) -> list[UsageRecord]:
        """Finished jobs (of ``accounts``) that ended after ``since`` and not after
        ``until``, oldest id first."""
        cutoff = since.timestamp()
        last = until.timestamp() if until is not None else None
        records = []
        for job_id in sorted(self._job_ids(), key=int):
            spec, status = self._spec(job_id), self._status(job_id)
            if spec is None or status is None or not status.final:
                continue
            if accounts is not None and spec.get("account") not in accounts:
                continue
            if status.end_time is None or status.end_time.timestamp() <= cutoff:
                continue
            if last is not None and status.end_time.timestamp() > last:
                continue
            records.append(_usage_record(spec, status))
        return records

    def read_output(self, ref: SchedulerJobRef, stream: str = "stdout", tail: int = 65536) -> str:
        """The last ``tail`` bytes of the job's stdout or stderr file."""
        if stream not in (sup.STDOUT_FILE, sup.STDERR_FILE):
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        if _TASK_REF.match(ref.job_id):
            run = self._task_run(ref.job_id)
            if run is None:
                return ""  # not started yet
            ref = replace(ref, job_id=run)
        jobdir = self._jobdir(ref.job_id)
        if jobdir is None:
            raise AdapterError(f"local adapter: no job {ref.job_id!r}", code="not_found")
        try:
            with open(jobdir / stream, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - max(0, tail)))
                data = fh.read()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace")

    def health(self) -> Health:
        """Checks that the job directory is writable and the supervisor can run."""
        t0 = time.monotonic()
        checks: dict[str, Any] = {"data_dir": str(self._root)}
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            probe = self._root / f".health-{os.getpid()}-{threading.get_ident()}"
            probe.write_bytes(b"ok")
            probe.unlink()
            checks["writable"] = True
        except OSError as exc:
            checks["writable"] = False
            return Health(ok=False, detail=f"job directory not writable: {exc}",
                          latency_ms=(time.monotonic() - t0) * 1000, checks=checks)
        ok = shutil.which(self._python) is not None or os.access(self._python, os.X_OK)
        checks["python"] = ok
        detail = "ok" if ok else f"supervisor interpreter {self._python!r} not found"
        latency = (time.monotonic() - t0) * 1000
        return Health(ok=ok, detail=detail, latency_ms=latency, checks=checks)

    def discover(self) -> list[PartitionInfo]:
        """The partitions from the settings (or the one default ``local`` partition)."""
        return [p.info() for p in self._partitions]

    def expected_start(self, spec: JobSpec) -> StartEstimate:
        """Jobs start at once here (no queue): now, once the request fits."""
        self._check_request(spec, self._partition_for(spec))
        return StartEstimate(datetime.now(tz=UTC), "immediate", "the local adapter starts jobs at once")

    def output_location(self, ref: SchedulerJobRef, stream: str = "stdout") -> str | None:
        """``<data_dir>/local-jobs/<job id>/stdout`` (or ``stderr``) on the broker's machine."""
        job_id = self._task_run(ref.job_id) if _TASK_REF.match(ref.job_id) else ref.job_id
        if stream not in (sup.STDOUT_FILE, sup.STDERR_FILE) or job_id is None or not job_id.isdigit():
            return None
        return str(self._root / job_id / stream)

    def user_exists(self, username: str) -> bool | None:
        """Any name works: every job runs as the broker's own OS user (dev only)."""
        return True

    def account_exists(self, account: str) -> bool | None:
        """Accounts are labels here: any name works."""
        return True


def _usage_record(spec: Mapping[str, Any], status: JobStatus) -> UsageRecord:
    submitted = status.submit_time or status.end_time
    assert submitted is not None
    return UsageRecord(
        job_id=status.job_id, account=str(spec.get("account", "")),
        username=str(spec.get("username", "")), partition=spec.get("partition"),
        state=status.state, raw_state=status.raw_state, submit_time=submitted,
        start_time=status.start_time, end_time=status.end_time,
        elapsed_seconds=status.elapsed_seconds or 0, alloc_tres=status.alloc_tres,
        tag=status.tag, name=spec.get("name"),
        array_job_id=spec.get("array_job_id"), array_task_id=spec.get("array_task_id"),
    )
