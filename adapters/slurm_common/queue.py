"""Queue records (``squeue --json``, slurmrestd job objects) → one shape.

``squeue --json`` and the REST ``/slurm/vX/job(s)`` answers share field names
(``job_id``, ``job_state``, ``tres_alloc_str``, ``standard_output``...); 22.05
prints plain values, 23.02+ wraps numbers and lists states. A queue record is
never proof that a job ended: only accounting settles a job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapters.slurm_common.accounting import MalformedRecord, tag_from_comment
from adapters.slurm_common.arrays import ArrayPart, array_from_queue
from adapters.slurm_common.shapes import (
    as_int,
    as_str,
    epoch_to_datetime,
    exit_code,
    is_infinite,
    state_words,
)
from adapters.slurm_common.states import base_state, is_terminal, translate
from adapters.slurm_common.tags import tag_from_job_name
from adapters.slurm_common.tres import parse_tres_string
from broker.states import JobState

__all__ = ["QueueJob", "queue_job_from_json"]


@dataclass(frozen=True)
class QueueJob:
    """One job as the controller's queue reports it."""

    job_id: str
    raw_state: str
    state: JobState
    name: str | None = None
    user: str | None = None
    account: str | None = None
    partition: str | None = None
    reason: str | None = None
    submit_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    time_limit_minutes: int | None = None
    alloc_tres: Mapping[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    standard_output: str | None = None
    standard_error: str | None = None
    comment: str | None = None
    #: an array task (or the record of an array's pending tasks); None otherwise
    array: ArrayPart | None = None

    @property
    def tag(self) -> str | None:
        """The broker tag, from the job name or the comment."""
        return tag_from_job_name(self.name) or tag_from_comment(self.comment)

    @property
    def terminal(self) -> bool:
        """True when the queue already shows an end state (22.05 keeps finished
        jobs in ``squeue --json`` for MinJobAge)."""
        return is_terminal(self.raw_state)


def _reason(value: Any) -> str | None:
    text = as_str(value)
    return None if text in {None, "None"} else text


def queue_job_from_json(job: Mapping[str, Any]) -> QueueJob:
    """One ``jobs[]`` element of ``squeue --json`` (or a REST job object).

    Raises :class:`~adapters.slurm_common.accounting.MalformedRecord` when the
    job id is missing.
    """
    if not isinstance(job, Mapping):
        raise MalformedRecord("job record is not an object")
    number = as_int(job.get("job_id"))
    if number is None or number <= 0:
        raise MalformedRecord(f"bad job id {job.get('job_id')!r}")
    words = state_words(job.get("job_state"))
    raw = base_state(words) if words else "UNKNOWN"
    limit = job.get("time_limit")
    return QueueJob(
        array=array_from_queue(job),
        job_id=str(number),
        raw_state=raw,
        state=translate(words or raw),
        name=as_str(job.get("name")),
        user=as_str(job.get("user_name")),
        account=as_str(job.get("account")),
        partition=as_str(job.get("partition")),
        reason=_reason(job.get("state_reason")),
        submit_time=epoch_to_datetime(job.get("submit_time")),
        start_time=epoch_to_datetime(job.get("start_time")),
        end_time=epoch_to_datetime(job.get("end_time")),
        time_limit_minutes=None if is_infinite(limit) else as_int(limit),
        alloc_tres=parse_tres_string(as_str(job.get("tres_alloc_str"))),
        exit_code=exit_code(job.get("exit_code")),
        standard_output=as_str(job.get("standard_output")),
        standard_error=as_str(job.get("standard_error")),
        comment=as_str(job.get("comment")),
    )
