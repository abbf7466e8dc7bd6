"""Accounting records (``sacct --json``, slurmdb REST, ``sacct -P``) → one shape.

:class:`AccountingJob` is what the Slurm adapters read from accounting: the
translated state, allocated TRES, elapsed time and exit code, plus the checks
that decide whether a record is trustworthy enough to settle a job
(:meth:`AccountingJob.is_settled`). Right after a job ends, slurmdbd may still
hold a placeholder (name ``allocation``, time limit 0) for a few seconds; such a
record is never treated as final.

The JSON readers accept 22.05 (plain values) and 23.02+ (``{"set","number"}``,
lists) shapes alike; the slurmdb REST job objects have the same layout as
``sacct --json`` jobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from adapters.slurm_common.arrays import ArrayPart, array_from_accounting, parse_job_id_text
from adapters.slurm_common.shapes import (
    as_int,
    as_str,
    epoch_to_datetime,
    exit_code,
    is_infinite,
    state_words,
)
from adapters.slurm_common.states import base_state, is_terminal, translate
from adapters.slurm_common.tags import TAG_MARK, tag_from_job_name
from adapters.slurm_common.tres import parse_tres_string, tres_list_to_map
from broker.adapter import UsageRecord
from broker.states import JobState

__all__ = [
    "PLACEHOLDER_JOB_NAME",
    "SACCT_PARSABLE_FIELDS",
    "SACCT_PARSABLE_FIELDS_SLUID",
    "AccountingJob",
    "MalformedRecord",
    "accounting_job_from_json",
    "accounting_job_from_parsable",
    "tag_from_comment",
]

#: The job name slurmdbd shows before the real record has arrived.
PLACEHOLDER_JOB_NAME = "allocation"

#: ``sacct -P --format`` fields read by :func:`accounting_job_from_parsable`, in
#: order. ``JobName`` is last so that a ``|`` inside a name cannot shift fields.
SACCT_PARSABLE_FIELDS: tuple[str, ...] = (
    "JobIDRaw",
    "JobID",
    "User",
    "Account",
    "Partition",
    "State",
    "Submit",
    "Start",
    "End",
    "ElapsedRaw",
    "TimelimitRaw",
    "AllocTRES",
    "ExitCode",
    "JobName",
)

#: The same with Slurm 26.05's globally unique job id (``SLUID``), before the name.
SACCT_PARSABLE_FIELDS_SLUID: tuple[str, ...] = (*SACCT_PARSABLE_FIELDS[:-1], "SLUID", "JobName")

_COMMENT_PREFIX = "aifa-broker:"


class MalformedRecord(ValueError):
    """An accounting record lacks the fields every job has (id, submit time)."""


@dataclass(frozen=True)
class AccountingJob:
    """One job (allocation level) as accounting reports it."""

    job_id: str
    raw_state: str
    state: JobState
    submit_time: datetime | None
    name: str | None = None
    user: str | None = None
    account: str | None = None
    partition: str | None = None
    reason: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    elapsed_seconds: int | None = None
    time_limit_minutes: int | None = None
    alloc_tres: Mapping[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    comment: str | None = None
    #: Slurm 26.05+ ``sluid``: unique across the cluster's whole history
    global_id: str | None = None
    #: an array task (or the record of an array's pending tasks); None otherwise
    array: ArrayPart | None = None

    @property
    def tag(self) -> str | None:
        """The broker tag, from the job name (always stored) or the comment."""
        return tag_from_job_name(self.name) or tag_from_comment(self.comment)

    @property
    def terminal(self) -> bool:
        """True when the recorded state is an end state."""
        return is_terminal(self.raw_state)

    @property
    def placeholder(self) -> bool:
        """True for the stand-in record slurmdbd shows right after a job ends."""
        return self.name == PLACEHOLDER_JOB_NAME or self.time_limit_minutes == 0

    def is_settled(self, now: datetime, lag_seconds: float = 0.0) -> bool:
        """True when this record may settle the job: terminal, with an end time,
        not a placeholder, and ended at least ``lag_seconds`` before ``now``."""
        if not self.terminal or self.placeholder or self.end_time is None:
            return False
        if self.elapsed_seconds is None:
            return False
        return now - self.end_time >= timedelta(seconds=lag_seconds)

    def to_usage_record(self) -> UsageRecord:
        """The record for usage import; raises :class:`MalformedRecord` when a
        field the import key or the charge needs is missing."""
        if self.submit_time is None:
            raise MalformedRecord(f"job {self.job_id}: no submit time")
        if not self.account or not self.user:
            raise MalformedRecord(f"job {self.job_id}: no account or user")
        return UsageRecord(
            job_id=self.job_id,
            account=self.account,
            username=self.user,
            partition=self.partition,
            state=self.state,
            raw_state=self.raw_state,
            submit_time=self.submit_time,
            start_time=self.start_time,
            end_time=self.end_time,
            elapsed_seconds=self.elapsed_seconds or 0,
            alloc_tres=dict(self.alloc_tres),
            tag=self.tag,
            name=self.name,
            global_id=self.global_id,
            array_job_id=self.array.array_job_id if self.array else None,
            array_task_id=self.array.task if self.array else None,
        )


def tag_from_comment(comment: str | None) -> str | None:
    """The broker tag in a job comment written by ``comment_for_tag``."""
    if comment and comment.startswith(_COMMENT_PREFIX):
        return tag_from_job_name(TAG_MARK + comment[len(_COMMENT_PREFIX) :].strip())
    return None


def _job_id(value: Any) -> str:
    number = as_int(value)
    if number is None or number <= 0:
        raise MalformedRecord(f"bad job id {value!r}")
    return str(number)


def _comment(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return as_str(value.get("job"))
    return as_str(value)


def _reason(state: Any) -> str | None:
    reason = as_str(state.get("reason")) if isinstance(state, Mapping) else None
    return None if reason in {None, "None"} else reason


def _time_limit(value: Any) -> int | None:
    if is_infinite(value):
        return None
    return as_int(value)


def _sub(job: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = job.get(key)
    return value if isinstance(value, Mapping) else {}


def accounting_job_from_json(job: Mapping[str, Any]) -> AccountingJob:
    """One ``jobs[]`` element of ``sacct --json`` (or a slurmdb REST job).

    Raises :class:`MalformedRecord` when the job id is missing or invalid.
    """
    if not isinstance(job, Mapping):
        raise MalformedRecord("job record is not an object")
    job_id = _job_id(job.get("job_id"))
    state_obj = job.get("state")
    words = state_words(state_obj)
    raw = base_state(words) if words else "UNKNOWN"
    times = _sub(job, "time")
    tres = _sub(job, "tres")
    association = _sub(job, "association")
    return AccountingJob(
        job_id=job_id,
        raw_state=raw,
        state=translate(raw),
        submit_time=epoch_to_datetime(times.get("submission")),
        name=as_str(job.get("name")),
        user=as_str(job.get("user")) or as_str(association.get("user")),
        account=as_str(job.get("account")) or as_str(association.get("account")),
        partition=as_str(job.get("partition")),
        reason=_reason(state_obj),
        start_time=epoch_to_datetime(times.get("start")),
        end_time=epoch_to_datetime(times.get("end")),
        elapsed_seconds=as_int(times.get("elapsed")),
        time_limit_minutes=_time_limit(times.get("limit")),
        alloc_tres=tres_list_to_map(tres.get("allocated")),
        exit_code=exit_code(job.get("exit_code")),
        comment=_comment(job.get("comment")),
        array=array_from_accounting(job),
    )


def accounting_job_from_parsable(values: Mapping[str, str]) -> AccountingJob:
    """One ``sacct -P`` row (field name → text) with times printed as epoch
    seconds (``SLURM_TIME_FORMAT=%s``). Raises :class:`MalformedRecord`."""
    job_id_text = values.get("JobIDRaw", "")
    if not job_id_text.isdigit():
        raise MalformedRecord(f"bad job id {job_id_text!r}")
    raw = base_state(values.get("State", ""))
    return AccountingJob(
        job_id=str(int(job_id_text)),
        raw_state=raw,
        state=translate(raw),
        submit_time=epoch_to_datetime(values.get("Submit")),
        name=as_str(values.get("JobName")),
        user=as_str(values.get("User")),
        account=as_str(values.get("Account")),
        partition=as_str(values.get("Partition")),
        start_time=epoch_to_datetime(values.get("Start")),
        end_time=epoch_to_datetime(values.get("End")),
        elapsed_seconds=as_int(values.get("ElapsedRaw")),
        time_limit_minutes=_time_limit(values.get("TimelimitRaw")),
        alloc_tres=parse_tres_string(values.get("AllocTRES")),
        exit_code=exit_code(values.get("ExitCode")),
        global_id=as_str(values.get("SLUID")),
        array=parse_job_id_text(values.get("JobID", "")),
    )
