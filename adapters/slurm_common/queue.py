"""Queue records (``squeue --json``, ``squeue --Format``, slurmrestd job objects) → one shape.

``squeue --json`` and the REST ``/slurm/vX/job(s)`` answers share field names
(``job_id``, ``job_state``, ``tres_alloc_str``, ``standard_output``...); 22.05
prints plain values, 23.02+ wraps numbers and lists states. A queue record is
never proof that a job ended: only accounting settles a job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapters.slurm_common.accounting import MalformedRecord, tag_from_comment
from adapters.slurm_common.arrays import ArrayPart, array_from_queue, array_from_queue_text
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

__all__ = ["SQUEUE_POLL_FIELDS", "QueueJob", "queue_job_from_json", "queue_job_from_text", "reason_code",
           "split_poll_line"]

#: ``squeue --Format`` fields of a poll line, in this order, ``|`` between them. No job
#: name or comment: they are the submitter's free text (a name may hold ``|`` and
#: newlines). The reason is the one text field (the controller's description when it
#: set one, which may hold anything): it comes last. Each line also carries a random
#: per-poll mark after the job id and at its end (:func:`split_poll_line`).
SQUEUE_POLL_FIELDS = ("JobID", "ArrayJobID", "ArrayTaskID", "State", "SubmitTime", "StartTime",
                      "UserName", "Account", "tres-alloc", "Reason")
#: a reason text that starts with a Slurm reason code (``ReqNodeNotAvail, UnavailableNodes:n1``,
#: ``RaisedSignal:53(Real-time signal 19)``): the code alone, as ``squeue --json`` gives it
_REASON_CODE_RE = re.compile(r"[A-Z][A-Za-z0-9_]*(?=$|[:,(])")


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


def reason_code(text: str) -> str | None:
    """The reason of a text ``squeue`` line as ``squeue --json`` gives it (``state_reason``).

    Text ``squeue`` prints the job's description instead of its reason code when the
    controller set one; such descriptions start with the code followed by details,
    which are cut off (details such as node lists change between polls and are not
    the code). A description without a leading code is kept whole."""
    text = text.strip()
    if not text or text == "None":
        return None
    m = _REASON_CODE_RE.match(text)
    return m.group(0) if m else text


def _epoch_text(text: str) -> datetime | None:
    """``SLURM_TIME_FORMAT=%s`` times: digits, or ``N/A``/``Unknown``/``None`` when unset."""
    text = text.strip()
    return epoch_to_datetime(int(text)) if text.isdigit() else None


def queue_job_from_text(row: Sequence[str]) -> QueueJob:
    """The fields of one ``squeue --noheader --Format=<SQUEUE_POLL_FIELDS>`` line as
    :func:`split_poll_line` gives them (times as epoch seconds).

    The state is Slurm's extended state word (a flag such as ``COMPLETING`` wins over
    the base state, as in 22.05's JSON). The TRES are kept only once the job is
    allocated: for a waiting job squeue prints the request (JSON: nothing).
    Raises :class:`~adapters.slurm_common.accounting.MalformedRecord` on a wrong field
    count, job id or state word.
    """
    if len(row) != len(SQUEUE_POLL_FIELDS):
        raise MalformedRecord(f"{len(row)} fields, expected {len(SQUEUE_POLL_FIELDS)}")
    job_id, array_id, array_task, word, submit, start, user, account, tres, reason = row
    if not job_id.isdigit() or int(job_id) <= 0:
        raise MalformedRecord(f"bad job id {job_id[:40]!r}")
    raw = word.strip().upper()
    if not raw.replace("_", "").isalpha():
        raise MalformedRecord(f"bad job state {word[:40]!r}")
    state = translate(raw)
    return QueueJob(
        job_id=str(int(job_id)),
        raw_state=base_state(raw),
        state=state,
        user=user.strip() or None,
        account=account.strip() or None,
        reason=reason_code(reason),
        submit_time=_epoch_text(submit),
        start_time=_epoch_text(start),
        alloc_tres=parse_tres_string(tres.strip()) if state is not JobState.PENDING else {},
        array=array_from_queue_text(array_id, array_task),
    )


def split_poll_line(line: str, mark: str) -> list[str]:
    """The fields of a poll line ``<job id>|<mark>|<fields...>|<reason>|<mark>``.

    ``mark`` is random per poll, so no text stored in the controller can hold it: a
    line counts only with the mark after its job id and at its end. A line break in a
    reason then cannot pass off the text after it as a line of another job (the text
    before the break lacks the end mark, the text after it the first one). The reason
    may hold ``|``. Raises :class:`~adapters.slurm_common.accounting.MalformedRecord`
    for any other line.
    """
    width = len(SQUEUE_POLL_FIELDS)
    head = line.split("|", width)
    if len(head) != width + 1 or head[1] != mark:
        raise MalformedRecord("line without this poll's mark after the job id")
    reason, sep, end = head[-1].rpartition("|")
    if not sep or end != mark:
        raise MalformedRecord("line without this poll's mark at its end")
    return [head[0], *head[2:-1], reason]


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
