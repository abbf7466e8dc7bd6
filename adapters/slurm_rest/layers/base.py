"""The contract of a translation layer: one per slurmrestd API version.

A layer knows its version's paths and JSON shapes, nothing else: it builds
request bodies from :class:`~adapters.slurm_rest.model.SubmitRequest` and turns
response items into :mod:`~adapters.slurm_rest.model` records. All decisions
(which jobs, which state, what to charge) are made above it.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

from adapters.slurm_common import shapes as fields
from adapters.slurm_common import tres
from adapters.slurm_common.arrays import array_from_accounting, array_from_queue
from adapters.slurm_common.states import is_terminal
from adapters.slurm_rest.model import (
    AccountingQuery,
    NodeRecord,
    PartitionRecord,
    PingResult,
    SlurmJob,
    SubmitRequest,
)

JsonObject = dict[str, Any]
#: query parameters; a list value is sent as the parameter repeated
QueryParams = dict[str, str | list[str]]


class ApiLayer(abc.ABC):
    """Paths and JSON shapes of one slurmrestd API version."""

    #: the version string as in the URL, e.g. ``"v0.0.38"``
    version: ClassVar[str]
    #: ``"/"`` where collection paths end with a slash (v0.0.40+)
    collection_suffix: ClassVar[str] = "/"
    #: the job description field (in the submit body) that requests GPUs per node
    gpu_request_field: ClassVar[str]
    #: ``DELETE job`` answers success even when the signal was refused (v0.0.40/41):
    #: the adapter must look at the job afterwards
    cancel_needs_check: ClassVar[bool] = False

    # ---- paths -------------------------------------------------------------
    def _slurm(self, tail: str) -> str:
        return f"/slurm/{self.version}/{tail}"

    def _slurmdb(self, tail: str) -> str:
        return f"/slurmdb/{self.version}/{tail}"

    @property
    def submit_path(self) -> str:
        """POST: submit a batch job."""
        return self._slurm("job/submit")

    @property
    def jobs_path(self) -> str:
        """GET: every job slurmctld holds."""
        return self._slurm("jobs" + self.collection_suffix)

    def job_path(self, job_id: str) -> str:
        """DELETE: cancel one job."""
        return self._slurm(f"job/{job_id}")

    @property
    def db_jobs_path(self) -> str:
        """GET: jobs from accounting."""
        return self._slurmdb("jobs" + self.collection_suffix)

    def db_path(self, tail: str, *, collection: bool = True) -> str:
        """GET: an accounting path (``clusters``, ``account/NAME``, ...)."""
        return self._slurmdb(tail + (self.collection_suffix if collection else ""))

    @property
    def ping_path(self) -> str:
        """GET: ping the controllers."""
        return self._slurm("ping" + self.collection_suffix)

    @property
    def db_health_path(self) -> str:
        """GET: a cheap slurmdbd round trip (diag; ping where it exists)."""
        return self._slurmdb("diag" + self.collection_suffix)

    @property
    def partitions_path(self) -> str:
        """GET: all partitions."""
        return self._slurm("partitions" + self.collection_suffix)

    @property
    def nodes_path(self) -> str:
        """GET: all nodes."""
        return self._slurm("nodes" + self.collection_suffix)

    # ---- requests ----------------------------------------------------------
    @abc.abstractmethod
    def submit_body(self, request: SubmitRequest) -> JsonObject:
        """The JSON body of ``POST job/submit``."""

    @staticmethod
    def job_description(body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The job description object inside a submit body."""
        job = body.get("job")
        return job if isinstance(job, Mapping) else {}

    @abc.abstractmethod
    def accounting_params(self, query: AccountingQuery) -> QueryParams:
        """Query parameters of ``GET slurmdb/jobs``."""

    # ---- responses ---------------------------------------------------------
    @staticmethod
    def submitted_job_id(body: Mapping[str, Any]) -> str | None:
        """The new job's id in a submit response (top level, or ``result``)."""
        for holder in (body, body.get("result")):
            if isinstance(holder, Mapping):
                job_id = fields.as_int(holder.get("job_id"))
                if job_id:
                    return str(job_id)
        return None

    @staticmethod
    def items(body: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
        """The objects of list ``key`` of a response (non-objects skipped)."""
        value = body.get(key)
        if not isinstance(value, list):
            return []
        return [v for v in value if isinstance(v, Mapping)]

    def cancel_failures(self, body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """Per-job failures inside a successful ``DELETE job`` answer, as
        ``errors``-style items (none before v0.0.42)."""
        return []

    # ---- jobs: one shape of reading, the version differences in the hooks below ----

    def parse_queue_job(self, item: Mapping[str, Any]) -> SlurmJob:
        """One item of ``GET jobs`` (22.05 also lists finished jobs within MinJobAge)."""
        start = fields.epoch_to_datetime(item.get("start_time"))
        states = tuple(fields.state_words(item.get("job_state")))
        end = ended_at(states, item.get("end_time"))
        return SlurmJob(
            job_id=str(fields.as_int(item.get("job_id"))),
            states=states,
            name=text(item.get("name")),
            user=text(item.get("user_name")),
            account=text(item.get("account")),
            partition=text(item.get("partition")),
            reason=reason(item.get("state_reason")),
            exit_code=self.queue_exit_code(item.get("exit_code")) if end else None,
            submit_time=fields.epoch_to_datetime(item.get("submit_time")),
            start_time=start,
            end_time=end,
            elapsed_seconds=elapsed(start, end),
            time_limit_minutes=self.limit_minutes(item.get("time_limit")),
            alloc_tres=tres.parse_tres_string(text(item.get("tres_alloc_str"))),
            comment=text(item.get("comment")),
            stdout_path=self.stdout_path(item),
            array=array_from_queue(item),
        )

    def parse_accounting_job(self, item: Mapping[str, Any]) -> SlurmJob:
        """One item of ``GET slurmdb/jobs``."""
        times = mapping(item.get("time"))
        state = mapping(item.get("state"))
        return SlurmJob(
            job_id=str(fields.as_int(item.get("job_id"))),
            states=tuple(fields.state_words(state.get("current"))),
            name=text(item.get("name")),
            user=text(item.get("user")) or text(mapping(item.get("association")).get("user")),
            account=text(item.get("account")),
            partition=text(item.get("partition")),
            reason=reason(state.get("reason")),
            exit_code=self.accounting_exit_code(item),
            submit_time=fields.epoch_to_datetime(times.get("submission")),
            start_time=fields.epoch_to_datetime(times.get("start")),
            end_time=fields.epoch_to_datetime(times.get("end")),
            elapsed_seconds=fields.as_int(times.get("elapsed")),
            time_limit_minutes=self.limit_minutes(times.get("limit")),
            alloc_tres=tres.tres_list_to_map(mapping(item.get("tres")).get("allocated")),
            comment=text(mapping(item.get("comment")).get("job")),
            stdout_path=self.stdout_path_accounting(item),
            sluid=self.accounting_sluid(item),
            from_accounting=True,
            array=array_from_accounting(item),
        )

    @abc.abstractmethod
    def queue_exit_code(self, value: Any) -> int | None:
        """The exit code from a queue job's ``exit_code`` field."""

    @abc.abstractmethod
    def accounting_exit_code(self, item: Mapping[str, Any]) -> int | None:
        """The exit code of an accounting job (None when this version cannot tell)."""

    @abc.abstractmethod
    def limit_minutes(self, value: Any) -> int | None:
        """A time limit in minutes; unlimited or unset → None."""

    def stdout_path(self, item: Mapping[str, Any]) -> str | None:
        """The queue job's stdout path."""
        return text(item.get("standard_output"))

    def stdout_path_accounting(self, item: Mapping[str, Any]) -> str | None:
        """The accounting job's stdout path (none in older versions)."""
        return None

    def accounting_sluid(self, item: Mapping[str, Any]) -> str | None:
        """The globally unique job id (v0.0.45+); None before."""
        return None

    @abc.abstractmethod
    def parse_ping(self, item: Mapping[str, Any]) -> PingResult:
        """One item of ``GET ping``'s ``pings``."""

    @abc.abstractmethod
    def parse_partition(self, item: Mapping[str, Any]) -> PartitionRecord:
        """One item of ``GET partitions``."""

    def parse_node(self, item: Mapping[str, Any]) -> NodeRecord:
        """One item of ``GET nodes`` (same shape in every version); GPUs from ``gres``."""
        partitions = item.get("partitions") or []
        return NodeRecord(
            name=text(item.get("name")) or "?",
            cpus=fields.as_int(item.get("cpus")) or 0,
            real_memory_mb=fields.as_int(item.get("real_memory")) or 0,
            gpus=tres.gpus_in_gres(text(item.get("gres"))),
            partitions=tuple(str(p) for p in partitions if isinstance(p, str)),
        )


def relative_time(seconds_ago: int) -> str:
    """A Slurm relative time (``now-3600seconds``): no time zone, no URL-encoding issue."""
    return f"now-{max(0, int(seconds_ago))}seconds"


def window_params(query: AccountingQuery) -> QueryParams:
    """What every version's ``GET slurmdb/jobs`` takes alike: the window (times
    relative, ``now-Nseconds``), no steps, accounts and job names. ``end_time`` is
    required with ``state``: without it slurmdbd ends the window at its start and
    finds nothing (seen on 24.11). ``users`` and ``state`` differ by version."""
    params: QueryParams = {"start_time": relative_time(query.lookback_seconds), "skip_steps": "true"}
    if query.until_seconds:
        params["end_time"] = relative_time(query.until_seconds)
    elif query.states or query.until_seconds is not None:
        params["end_time"] = "now"
    if query.accounts:
        params["account"] = ",".join(query.accounts)
    if query.job_names:
        params["job_name"] = ",".join(query.job_names)
    return params


def text(value: Any) -> str | None:
    """A non-empty string or None."""
    return fields.as_str(value)


def environment_pairs(environment: Mapping[str, str]) -> list[str]:
    """``{"K": "V"}`` → ``["K=V"]`` (names were validated by the adapter)."""
    return [f"{k}={v}" for k, v in environment.items()]


def mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is an object, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def reason(value: Any) -> str | None:
    """A pending/state reason; Slurm's ``"None"`` means none."""
    found = text(value)
    return None if found in (None, "None") else found


def elapsed(start: datetime | None, end: datetime | None) -> int | None:
    """Whole seconds from ``start`` to ``end`` when both are known."""
    if start is None or end is None:
        return None
    return max(0, int((end - start).total_seconds()))


def ended_at(states: tuple[str, ...], value: Any) -> datetime | None:
    """A queue record's end time, only once it has ended: for pending and running
    jobs slurmctld reports the *expected* end (start + time limit) there."""
    if not states or not is_terminal(states):
        return None
    return fields.epoch_to_datetime(value)
