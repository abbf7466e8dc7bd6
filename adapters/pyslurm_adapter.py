"""The ``pyslurm`` adapter: libslurm through the pyslurm 25.11 API, on a login node.

**Unverified against a live libslurm**: no Slurm 25.11 packages exist on the
development machines, so this adapter is exercised only through the contract
suite with a stand-in module (``tests/contract/pyslurm_standin``) that
implements the part of the pyslurm 25.11 API used here, as documented. See
``docs/adapters/pyslurm.md``.

The broker runs on a login node of the cluster with pyslurm installed (extra
``aifa-broker[pyslurm]``); libslurm reads the node's ``slurm.conf``, so there are
no connection settings, and a broker process can serve one such cluster only
(libslurm's configuration is process-global). Calls used:

- submit: ``pyslurm.JobSubmitDescription(...).submit()`` (the script passed as
  content, the environment as a dict: only those variables plus ``SLURM_*``);
- poll: one ``pyslurm.Jobs.load()`` (queue) + one
  ``pyslurm.db.Jobs.load(pyslurm.db.JobFilter(ids=...))`` (accounting) per call;
- cancel: ``pyslurm.Job(id).cancel()`` (an array: its id, then its started tasks' own ids);
- usage / find_by_tag: ``pyslurm.db.Jobs.load(JobFilter(start_time=..., accounts=...))``;
- discover: ``pyslurm.Partitions.load()`` and ``pyslurm.Nodes.load()``;
- health: ``pyslurm.slurmctld.ping_primary()`` / ``ping_backup()`` and
  ``pyslurm.db.Connection.open()``.

Job arrays (``JobSpec.array``, ``JobSubmitDescription.array``) are tracked per
task from the ``array_id``/``array_task_id``/``array_tasks_waiting`` attributes
pyslurm documents — verified against the stand-in only; see
``docs/adapters/pyslurm.md`` ("Job arrays"), including what cannot be cancelled
alone through pyslurm's numeric job ids.

Identity: the adapter acts with the broker host's Slurm identity. With
``set_user_id`` (default true) each job is submitted with ``user_id`` /
``group_id`` of ``JobSpec.username`` (looked up in the login node's passwd), so it
runs as the user's own account — Slurm accepts that only from root or the
``SlurmUser``. With ``set_user_id = false`` every job runs as the broker's own
account (a shared service account: only where a site wants exactly that).

Settings (all optional):

``set_user_id``       submit as ``JobSpec.username`` (default true; needs root/SlurmUser)
``output_pattern``    stdout file, Slurm pattern with ``%j``/``%u``/``%%`` (default
                      ``aifa-%j.out``, relative to the working directory); stderr
                      uses the same pattern with ``.err`` for a trailing ``.out``
``job_path``          ``PATH`` given to jobs (default ``/usr/local/bin:/usr/bin:/bin``)
``lookback_days``     how far back ``find_by_tag`` searches without ``since`` (2)
``accounts``          Slurm accounts this broker manages: scopes ``find_by_tag``
"""

from __future__ import annotations

import importlib
import os
import pwd
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters.slurm_common.arrays import task_ids_from_bitmap, task_ids_from_text, task_key
from adapters.slurm_common.states import is_terminal, started_or_expected, translate
from adapters.slurm_common.tags import comment_for_tag, job_name_with_tag, tag_from_job_name
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterAdapter,
    ClusterUnreachable,
    Health,
    JobSpec,
    JobStatus,
    PartitionInfo,
    SchedulerJobRef,
    SubmitOutcomeUnknown,
    SubmitRejected,
    UsageRecord,
    refuse_directives,
    reject_unknown_settings,
)

__all__ = ["PySlurmAdapter"]

# Slurm error numbers (slurm_errno.h)
_CONNECT_ERRORS = frozenset({1001, 1800, 1801, 1803, 7000})
_REPLY_LOST_ERRORS = frozenset({1802, 5004})  # sent, answer lost: outcome unknown
_INVALID_JOB_ID = 2017
_ALREADY_DONE = 2021
_SUBMIT_CODES = {2000: "invalid_partition", 2002: "forbidden", 2045: "invalid_account",
                 2051: "invalid_time_limit", 2014: "invalid_request"}
_UNREACHABLE_TEXT = ("unable to contact slurm controller", "connection refused",
                     "socket timed out", "communication connection failure")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATTERN_TOKEN = re.compile(r"%[%ju]")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_UNLIMITED = "UNLIMITED"


def _reason(value: Any) -> str | None:
    """Slurm's reason word; its ``"None"`` means no reason."""
    text = str(value) if value else ""
    return None if text in {"", "None"} else text


def _epoch(value: Any) -> datetime | None:
    """A UTC datetime from pyslurm's unix timestamps (0/None = not set)."""
    if value in (None, 0, _UNLIMITED) or not isinstance(value, int | float):
        return None
    return datetime.fromtimestamp(value, UTC)


def _count(resource: Any) -> float | None:
    count = getattr(resource, "count", None)
    return float(count) if isinstance(count, int | float) else None


def tres_map(tres: Any) -> dict[str, float]:
    """Broker TRES names from a ``pyslurm.db.TrackableResources`` (None → ``{}``)."""
    if tres is None:
        return {}
    out: dict[str, float] = {}
    for key in ("cpu", "mem", "node", "billing"):
        value = _count(getattr(tres, key, None))
        if value is not None:
            out[key] = value
    gres = getattr(tres, "gres", None) or {}
    gpus = sum(_count(v) or 0.0 for k, v in gres.items() if k == "gpu" or k.startswith("gpu:"))
    if gpus:
        out["gres/gpu"] = gpus
    return out


def _gpus_in_gres(gres: Mapping[str, Any] | None) -> int:
    """GPUs in a node's ``configured_gres`` (``{"gpu": 4}`` / ``{"gpu:a100": 4}``)."""
    total = 0
    for key, value in (gres or {}).items():
        if key == "gpu" or key.startswith("gpu:"):
            total += int(value["count"] if isinstance(value, Mapping) else value)
    return total


def _exit_code(job: Any) -> int | None:
    code, sig = getattr(job, "exit_code", None), getattr(job, "exit_code_signal", None)
    if isinstance(sig, int) and sig > 0:
        return 128 + sig
    return code if isinstance(code, int) else None


def expand_output_pattern(pattern: str, job_id: str, user: str, workdir: str | None) -> str:
    """Expand ``%j``, ``%u``, ``%%`` as Slurm does; relative paths are under ``workdir``."""
    subst = {"%j": job_id, "%u": user, "%%": "%"}
    path = _PATTERN_TOKEN.sub(lambda m: subst[m.group(0)], pattern)
    return path if os.path.isabs(path) or not workdir else os.path.join(workdir, path)


class PySlurmAdapter(ClusterAdapter):
    """Cluster adapter over pyslurm; see the module docstring."""

    def __init__(self, name: str, settings: Mapping[str, Any], *, data_dir: str,
                 api: Any = None) -> None:
        """``api`` replaces the ``pyslurm`` module (tests pass a stand-in)."""
        super().__init__(name, settings, data_dir=data_dir)
        reject_unknown_settings("pyslurm", self.settings,
                                ("set_user_id", "output_pattern", "job_path", "lookback_days", "accounts"))
        self._ps: Any = api if api is not None else self._import_pyslurm()
        self._lock = threading.Lock()  # pyslurm/libslurm calls are serialised
        self._set_user_id = bool(self.settings.get("set_user_id", True))
        self._output_pattern = str(self.settings.get("output_pattern", "aifa-%j.out"))
        if re.search(r"%[^%ju]", self._output_pattern.replace("%%", "")):
            raise AdapterConfigError("pyslurm adapter: output_pattern supports only %j, %u, %%")
        self._job_path = str(self.settings.get("job_path", _DEFAULT_PATH))
        self._lookback = timedelta(days=float(self.settings.get("lookback_days", 2)))
        accounts = self.settings.get("accounts")
        self._accounts = [str(a) for a in accounts] if accounts else None

    @staticmethod
    def _import_pyslurm() -> Any:
        try:
            return importlib.import_module("pyslurm")
        except ImportError as exc:
            raise AdapterConfigError(
                "pyslurm adapter: the pyslurm module is not installed "
                "(pip install 'aifa-broker[pyslurm]' on a node with libslurm 25.11)"
            ) from exc

    # ------------------------------------------------------------------ errors

    def _error(self, exc: BaseException, during: str, *, submitting: bool = False) -> AdapterError:
        """The adapter exception for a pyslurm error."""
        errno = getattr(exc, "errno", None)
        message = f"pyslurm {during}: {exc}"
        lowered = str(exc).lower()
        if errno in _REPLY_LOST_ERRORS:
            return SubmitOutcomeUnknown(message) if submitting else ClusterUnreachable(message)
        if errno in _CONNECT_ERRORS or any(t in lowered for t in _UNREACHABLE_TEXT):
            return ClusterUnreachable(message)
        if submitting:
            return SubmitRejected(message, code=_SUBMIT_CODES.get(errno or 0, "submit_rejected"))
        return AdapterError(message, transient=False)

    def _call(self, during: str, func: Any, *args: Any, submitting: bool = False,
              **kwargs: Any) -> Any:
        """Run one pyslurm call under the lock, translating its errors."""
        with self._lock:
            try:
                return func(*args, **kwargs)
            except self._ps.RPCError as exc:
                raise self._error(exc, during, submitting=submitting) from exc
            except (ValueError, TypeError) as exc:
                if submitting:
                    raise SubmitRejected(f"pyslurm {during}: {exc}", code="invalid_request") from exc
                raise AdapterError(f"pyslurm {during}: {exc}") from exc

    # ------------------------------------------------------------------ submit

    def submit(self, spec: JobSpec) -> SchedulerJobRef:
        """Submit ``spec`` with ``JobSubmitDescription.submit()``."""
        desc = self._ps.JobSubmitDescription(**self._description(spec))
        job_id = self._call("submit", desc.submit, submitting=True)
        return SchedulerJobRef(job_id=str(job_id), username=spec.username, tag=spec.tag,
                               submit_time=datetime.now(UTC))

    def _account_of(self, username: str) -> pwd.struct_passwd:
        if not self._set_user_id:
            return pwd.getpwuid(os.getuid())
        try:
            return pwd.getpwnam(username)
        except KeyError as exc:
            raise SubmitRejected(f"no POSIX account {username!r} on this login node",
                                 code="no_cluster_account") from exc

    def _description(self, spec: JobSpec) -> dict[str, Any]:
        """The ``JobSubmitDescription`` attributes for ``spec`` (the effective request;
        the script's directives are already neutralised and libslurm does not read
        them — pyslurm only does on an explicit ``load_sbatch_options()``)."""
        refuse_directives(spec.script)
        bad = [k for k, v in spec.environment.items()
               if not _ENV_NAME.fullmatch(k) or "\0" in v]
        if bad:
            raise SubmitRejected(f"invalid environment variables: {', '.join(map(repr, bad))}",
                                 code="invalid_environment")
        account = self._account_of(spec.username)
        workdir = spec.working_directory or account.pw_dir
        env = {"PATH": self._job_path, "HOME": account.pw_dir, "USER": account.pw_name,
               "LOGNAME": account.pw_name, **spec.environment, "AIFA_BROKER_TAG": spec.tag}
        err_pattern = (self._output_pattern[:-4] + ".err" if self._output_pattern.endswith(".out")
                       else self._output_pattern + ".err")
        desc: dict[str, Any] = {
            "name": job_name_with_tag(spec.name, spec.tag), "comment": comment_for_tag(spec.tag),
            "account": spec.account, "script": _script_content(spec.script),
            "environment": env, "working_directory": workdir,
            "time_limit": str(spec.time_limit_minutes),
            "nodes": f"{spec.min_nodes}-{spec.nodes}" if spec.min_nodes else spec.nodes,
            "ntasks": spec.ntasks if spec.ntasks is not None else spec.nodes * spec.ntasks_per_node,
            "ntasks_per_node": spec.ntasks_per_node,
            "cpus_per_task": spec.cpus_per_task,
            "standard_output": self._output_pattern, "standard_error": err_pattern,
        }
        if spec.partition:
            desc["partitions"] = spec.partition
        if spec.gpus_per_node:
            desc["gres_per_node"] = {f"gpu:{spec.gpu_type}" if spec.gpu_type else "gpu": spec.gpus_per_node}
        if spec.exclusive:
            desc["resource_sharing"] = "exclusive"
        for attr, value in (("constraints", spec.constraint), ("mail_types", spec.mail_type),
                            ("mail_user", spec.mail_user), ("array", spec.array),
                            ("dependencies", spec.dependency)):
            if value:
                desc[attr] = value
        if spec.memory_per_node_mb:
            desc["memory_per_node"] = spec.memory_per_node_mb
        if self._set_user_id:
            desc["user_id"] = account.pw_uid
            desc["group_id"] = account.pw_gid
        return desc

    # ------------------------------------------------------------------ poll

    def poll(self, refs: Sequence[SchedulerJobRef]) -> list[JobStatus]:
        """One queue load + at most one accounting load for all ``refs``. An array
        ref (``array_tasks``) is answered per task (``<id>_<task>``): a started
        task is a record of its own, the waiting ones one record for them all."""
        valid = [r for r in refs if r.job_id.isdigit()]
        if not valid:
            return []
        queue = _by_key(self._call("job query", self._ps.Jobs.load).values(), {int(r.job_id) for r in valid})
        wanted = [(r, key, task) for r in valid for key, task in _keys(r)]
        need = [(r, key) for r, key, _ in wanted if key not in queue or is_terminal(queue[key].state)]
        # a task's own id too while the queue still shows it: accounting then finds
        # the task even where selecting by the array's id would not
        need_db = sorted({int(r.job_id) for r, _ in need} | {int(queue[key].id) for _, key in need if key in queue})
        accounted = self._accounted(need_db)
        out = []
        for _ref, key, task in wanted:
            db_job, live = accounted.get(key), queue.get(key)
            if db_job is not None and (live is None or is_terminal(db_job.state)):
                status = self._status(db_job, accounting=True)
            elif live is not None:
                status = self._status(live, accounting=False)
            else:
                continue
            out.append(status if task is None else replace(status, job_id=key, array_task_id=task))
        return out

    def _accounted(self, ids: list[int]) -> dict[str, Any]:
        """Accounting records of ``ids`` (an array's id selects its tasks) by
        :func:`_by_key`; empty when slurmdbd cannot answer."""
        if not ids:
            return {}
        db = self._ps.db
        try:
            jobs = self._call("accounting query", db.Jobs.load, db.JobFilter(ids=ids))
        except AdapterError:
            return {}  # the queue still answers; finals wait for accounting
        return _by_key(jobs.values(), set(ids))

    def _status(self, job: Any, *, accounting: bool) -> JobStatus:
        raw = str(job.state)
        final = accounting and is_terminal(raw)
        elapsed = job.elapsed_time if accounting else getattr(job, "run_time", None)
        started, expected = started_or_expected(translate(raw), _epoch(job.start_time))
        return JobStatus(
            job_id=str(job.id), state=translate(raw), raw_state=raw, final=final,
            exit_code=_exit_code(job) if final else None,
            reason=_reason(getattr(job, "state_reason", None)),
            submit_time=_epoch(job.submit_time), start_time=started, expected_start=expected,
            end_time=_epoch(job.end_time) if is_terminal(raw) else None,
            elapsed_seconds=int(elapsed) if isinstance(elapsed, int | float) else None,
            alloc_tres=tres_map(job.allocated_tres), tag=tag_from_job_name(job.name),
        )

    # ------------------------------------------------------------------ cancel, lookup

    def cancel(self, ref: SchedulerJobRef) -> None:
        """``Job(id).cancel()``; a finished or purged job is not an error.

        ``<array id>_<task>`` cancels one started task by its own job id (pyslurm
        addresses jobs by number only: a task still waiting has none, so it cannot
        be cancelled alone — ``task_not_started``). ``<array id>`` cancels the whole
        array: the array's id (which also ends the waiting tasks), then every
        started task still alive by its own id, whether or not libslurm already
        ended them with the array."""
        array_id, task = _parse_key(ref.job_id)
        if task is not None:
            self._cancel_task(array_id, task)
            return
        self._kill(array_id)
        for _ in range(3):  # a waiting task may have started while the others were cancelled
            left = [j for j in self._array_records(array_id) if int(j.id) != array_id]
            if not left:
                return
            for job in left:
                self._kill(int(job.id))

    def _cancel_task(self, array_id: int, task: int) -> None:
        records = self._array_records(array_id)
        record = next((j for j in records if getattr(j, "array_task_id", None) == task), None)
        if record is None:
            if any(task in _waiting(j) for j in records):
                raise AdapterError(f"task {task} of array {array_id} has not started: pyslurm cancels by job id "
                                   "and a waiting task has none of its own yet; cancel the whole array, or "
                                   "this task once it runs", code="task_not_started", transient=False)
            return  # ended (or never existed): nothing to cancel
        if int(record.id) == array_id and len(records) > 1:
            # the last task to start takes over the array's own id, and that id
            # cancels the whole array
            raise AdapterError(f"task {task} of array {array_id} runs under the array's own job id, which "
                               "would cancel every task; cancel the whole array instead",
                               code="task_not_addressable", transient=False)
        self._kill(int(record.id))

    def _array_records(self, array_id: int) -> list[Any]:
        """The array's records slurmctld still has alive (one queue load)."""
        return [j for j in self._call("job query", self._ps.Jobs.load).values()
                if getattr(j, "array_id", None) == array_id and not is_terminal(str(j.state))]

    def _kill(self, job_id: int) -> None:
        with self._lock:
            try:
                self._ps.Job(job_id).cancel()
            except self._ps.RPCError as exc:
                if getattr(exc, "errno", None) in (_ALREADY_DONE, _INVALID_JOB_ID):
                    return
                raise self._error(exc, "cancel") from exc

    def find_by_tag(
        self, tags: Sequence[str], *, since: datetime | None = None, accounts: Sequence[str] | None = None
    ) -> dict[str, SchedulerJobRef]:
        """Scan queue and accounting job names for the tags (accounting of
        ``accounts`` only when given, else of the configured accounts)."""
        wanted = set(tags)
        found: dict[str, SchedulerJobRef] = {}
        start = since or datetime.now(UTC) - self._lookback
        db = self._ps.db
        filt = db.JobFilter(start_time=int(start.timestamp()),
                            accounts=list(accounts) if accounts else self._accounts)
        db_jobs = list(self._call("accounting query", db.Jobs.load, filt).values())
        live = list(self._call("job query", self._ps.Jobs.load).values())
        for job in [*db_jobs, *live]:  # live jobs win
            tag = tag_from_job_name(job.name)
            submitted = _epoch(job.submit_time)
            if tag in wanted and (since is None or submitted is None or submitted >= since):
                # an array's task records carry the array's id: the broker's id of it
                job_id = getattr(job, "array_id", None) or job.id
                found[tag] = SchedulerJobRef(job_id=str(job_id), username=str(job.user_name),
                                             tag=tag, submit_time=submitted,
                                             account=getattr(job, "account", None))
        return found

    def usage(self, since: datetime, *, accounts: Sequence[str] | None = None,
              until: datetime | None = None) -> list[UsageRecord]:
        """Finished jobs from accounting that ended after ``since`` and not after
        ``until``. ``JobFilter(start_time, end_time)`` selects the jobs eligible or
        running in that window (slurmdb_job_cond usage_start/usage_end; this filter
        sets no states), so ``until`` bounds the answer to them and the end times
        are checked here."""
        if until is not None and until <= since:
            return []
        db = self._ps.db
        last = int(until.timestamp()) if until is not None else int(time.time())
        filt = db.JobFilter(start_time=int(since.timestamp()), end_time=last,
                            accounts=list(accounts) if accounts is not None else None)
        jobs = _latest_by_id(self._call("accounting query", db.Jobs.load, filt).values())
        records = []
        for job in sorted(jobs.values(), key=lambda j: int(j.id)):
            end = _epoch(job.end_time)
            if not is_terminal(str(job.state)) or end is None or end <= since:
                continue
            if until is not None and end > until:
                continue
            if accounts is not None and job.account not in accounts:
                continue
            records.append(_usage_record(job))
        return records

    # ------------------------------------------------------------------ output, health, discover

    def read_output(self, ref: SchedulerJobRef, stream: str = "stdout", tail: int = 65536) -> str:
        """Tail of the job's output file, if this login node can read it."""
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        job = self._find_job(ref)
        pattern = self._output_pattern
        if stream == "stderr":
            pattern = pattern[:-4] + ".err" if pattern.endswith(".out") else pattern + ".err"
        # %j is the job id of the record that ran: an array task's own id
        path = expand_output_pattern(pattern, str(job.id), str(job.user_name),
                                     getattr(job, "working_directory", None))
        try:
            with open(path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - max(0, tail)))
                return fh.read().decode("utf-8", "replace")
        except OSError as exc:
            raise AdapterError(f"cannot read {path} on this login node: {exc.strerror}",
                               code="output_unavailable") from exc

    def _find_job(self, ref: SchedulerJobRef) -> Any:
        if "_" in ref.job_id:
            return self._find_task(ref)
        if ref.job_id.isdigit():
            with self._lock:
                try:
                    return self._ps.Job.load(int(ref.job_id))
                except self._ps.RPCError:
                    pass
            db = self._ps.db
            jobs = self._call("accounting query", db.Jobs.load,
                              db.JobFilter(ids=[int(ref.job_id)]))
            latest = _latest_by_id(jobs.values()).get(int(ref.job_id))
            if latest is not None:
                return latest
        raise AdapterError(f"no job {ref.job_id!r}", code="not_found")

    def _find_task(self, ref: SchedulerJobRef) -> Any:
        """The record of one array task (``<array id>_<task>``): queue, then accounting."""
        array_id, task = _parse_key(ref.job_id)
        live = _by_key(self._call("job query", self._ps.Jobs.load).values(), {array_id})
        record = live.get(ref.job_id) or self._accounted([array_id]).get(ref.job_id)
        if record is None:
            raise AdapterError(f"no job {ref.job_id!r}", code="not_found")
        if getattr(record, "array_task_id", None) != task:
            raise AdapterError(f"task {ref.job_id} has not started: no output yet", code="output_unavailable")
        return record

    def health(self) -> Health:
        """Ping slurmctld (primary, then backup) and open a slurmdbd connection."""
        t0 = time.monotonic()
        checks: dict[str, Any] = {"slurmctld": self._ping(), "slurmdbd": self._db_ok()}
        ok = bool(checks["slurmctld"]) and bool(checks["slurmdbd"])
        down = [k for k in ("slurmctld", "slurmdbd") if not checks[k]]
        detail = "ok" if ok else f"not responding: {', '.join(down)}"
        return Health(ok=ok, detail=detail, latency_ms=(time.monotonic() - t0) * 1000,
                      checks=checks)

    def _ping(self) -> bool:
        for ping in ("ping_primary", "ping_backup"):
            try:
                with self._lock:
                    if getattr(self._ps.slurmctld, ping)().is_responding:
                        return True
            except Exception:  # noqa: S112 - any failure means "not this controller"
                continue
        return False

    def _db_ok(self) -> bool:
        try:
            with self._lock:
                self._ps.db.Connection.open().close()
        except Exception:
            return False
        return True

    def discover(self) -> list[PartitionInfo]:
        """Partitions with per-node CPUs, GPUs, memory from their nodes."""
        parts = self._call("partition query", self._ps.Partitions.load)
        nodes = list(self._call("node query", self._ps.Nodes.load).values())
        return [_partition_info(p, [n for n in nodes if p.name in (n.partitions or [])])
                for p in parts.values()]


def _script_content(script: str) -> str:
    """The script as pyslurm must get it: with a shebang, and never mistakable for a
    path (pyslurm reads ``script`` as a file when it names an existing one)."""
    text = script if script.startswith("#!") else "#!/bin/sh\n" + script
    return text if "\n" in text else text + "\n"


def _parse_key(key: str) -> tuple[int, int | None]:
    """``7`` → (7, None); ``7_3`` → (7, 3) (an array task, as the broker names it)."""
    job_id, sep, task = key.partition("_")
    if not job_id.isdigit() or (sep and not task.isdigit()):
        raise AdapterError(f"not a Slurm job id: {key!r}", code="not_found")
    return int(job_id), int(task) if task else None


def _keys(ref: SchedulerJobRef) -> list[tuple[str, int | None]]:
    """What ``poll`` answers for ``ref``: its id, or ``<id>_<task>`` per tracked task."""
    if ref.array_tasks is None:
        return [(ref.job_id, None)]
    return [(task_key(ref.job_id, t), t) for t in ref.array_tasks]


def _waiting(job: Any) -> tuple[int, ...]:
    """The tasks a record of an array's waiting tasks stands for: slurmctld gives
    them as ranges (``2-5``), slurmdbd as a hexadecimal bitmap (``0x3C``)."""
    text = getattr(job, "array_tasks_waiting", None)
    text = str(text) if text else None
    return task_ids_from_bitmap(text) or task_ids_from_text(text)


def _record_keys(job: Any) -> list[str]:
    """The broker's names for what one queue or accounting record stands for."""
    array_id = getattr(job, "array_id", None)
    if not array_id:
        return [str(job.id)]
    task = getattr(job, "array_task_id", None)
    if task is not None:
        return [task_key(array_id, task)]
    return [task_key(array_id, t) for t in _waiting(job)]


def _by_key(jobs: Iterable[Any], ids: set[int]) -> dict[str, Any]:
    """Records of ``ids`` (a job's or an array's id) by :func:`_record_keys`: for each
    name the most recently submitted (job ids can be reused) and, between records
    of one array, a task's own record over the waiting tasks' record (should
    slurmdbd still list a started task among the waiting ones)."""
    ranked: dict[str, tuple[tuple[int, bool], Any]] = {}
    for job in jobs:
        if int(job.id) not in ids and int(getattr(job, "array_id", None) or 0) not in ids:
            continue
        rank = (int(job.submit_time or 0), getattr(job, "array_task_id", None) is not None)
        for key in _record_keys(job):
            known = ranked.get(key)
            if known is None or rank >= known[0]:
                ranked[key] = (rank, job)
    return {key: job for key, (_, job) in ranked.items()}


def _latest_by_id(jobs: Iterable[Any]) -> dict[int, Any]:
    """One record per job id: the most recently submitted (ids can be reused)."""
    latest: dict[int, Any] = {}
    for job in jobs:
        known = latest.get(int(job.id))
        if known is None or (job.submit_time or 0) >= (known.submit_time or 0):
            latest[int(job.id)] = job
    return latest


def _usage_record(job: Any) -> UsageRecord:
    submitted = _epoch(job.submit_time) or _epoch(job.end_time)
    assert submitted is not None
    array_id = getattr(job, "array_id", None)
    return UsageRecord(
        job_id=str(job.id), account=str(job.account), username=str(job.user_name),
        partition=job.partition or None, state=translate(str(job.state)),
        raw_state=str(job.state), submit_time=submitted, start_time=_epoch(job.start_time),
        end_time=_epoch(job.end_time), elapsed_seconds=int(job.elapsed_time or 0),
        alloc_tres=tres_map(job.allocated_tres), tag=tag_from_job_name(job.name), name=job.name,
        array_job_id=str(array_id) if array_id else None,
        array_task_id=getattr(job, "array_task_id", None) if array_id else None,
    )


def _partition_info(part: Any, nodes: list[Any]) -> PartitionInfo:
    cpus = max((int(n.total_cpus or 0) for n in nodes), default=0)
    gpus = max((_gpus_in_gres(n.configured_gres) for n in nodes), default=0)
    memory = max((int(n.real_memory or 0) for n in nodes), default=0)
    count = len(nodes) or int(part.total_nodes or 0)
    total_cpus = sum(int(n.total_cpus or 0) for n in nodes) or int(part.total_cpus or 0)
    tres: dict[str, float] = {"cpu": total_cpus, "node": count, "billing": total_cpus,
                              "mem": sum(int(n.real_memory or 0) for n in nodes)}
    total_gpus = sum(_gpus_in_gres(n.configured_gres) for n in nodes)
    if total_gpus:
        tres["gres/gpu"] = total_gpus
    max_time = part.max_time if isinstance(part.max_time, int) else None
    return PartitionInfo(name=part.name, default=bool(part.is_default), nodes=count,
                         cpus_per_node=cpus, gpus_per_node=gpus, memory_per_node_mb=memory,
                         max_time_minutes=max_time, tres=tres)
