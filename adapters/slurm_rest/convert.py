"""Version-neutral decisions on :class:`~adapters.slurm_rest.model.SlurmJob` records:
state translation, when accounting may settle a job, broker result types."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from adapters.slurm_common.states import is_terminal, started_or_expected, translate
from adapters.slurm_common.tags import TAG_MARK, tag_from_job_name
from adapters.slurm_rest.model import SlurmJob
from broker.adapter import JobStatus, UsageRecord

#: the job name slurmdbd shows for a few seconds after a job ends
PLACEHOLDER_NAME = "allocation"
_COMMENT_PREFIX = "aifa-broker:"


def raw_state(job: SlurmJob) -> str:
    """The scheduler's state words as one string (``"RUNNING,COMPLETING"``)."""
    return ",".join(job.states) if job.states else "UNKNOWN"


def job_tag(job: SlurmJob) -> str | None:
    """The broker tag from the job name (always stored) or the comment."""
    tag = tag_from_job_name(job.name)
    if tag is None and job.comment and job.comment.startswith(_COMMENT_PREFIX):
        tag = tag_from_job_name(TAG_MARK + job.comment[len(_COMMENT_PREFIX) :].strip())
    return tag


def terminal(job: SlurmJob) -> bool:
    """True when the record shows an end state."""
    return bool(job.states) and is_terminal(job.states)


def settled(job: SlurmJob) -> bool:
    """True when an accounting record may settle the job: terminal, with an end
    time and elapsed seconds, and not slurmdbd's placeholder (name
    ``allocation`` and no time limit) that precedes the real record."""
    if not job.from_accounting or not terminal(job) or job.end_time is None:
        return False
    if job.elapsed_seconds is None:
        return False
    return not (job.name == PLACEHOLDER_NAME and not job.time_limit_minutes)


def running_elapsed(job: SlurmJob, now: datetime) -> int | None:
    """Elapsed seconds; for a job still running, measured up to ``now``."""
    if job.elapsed_seconds is not None:
        return job.elapsed_seconds
    if job.start_time is not None and job.end_time is None:
        return max(0, int((now - job.start_time).total_seconds()))
    return None


def to_status(job: SlurmJob, *, final: bool, now: datetime | None = None) -> JobStatus:
    """The broker's view of one job record."""
    now = now or datetime.now(tz=UTC)
    state = translate(job.states) if job.states else translate("UNKNOWN")
    started, expected = started_or_expected(state, job.start_time)
    return JobStatus(
        job_id=job.job_id,
        state=state,
        raw_state=raw_state(job),
        final=final,
        exit_code=job.exit_code if terminal(job) else None,
        reason=job.reason,
        submit_time=job.submit_time,
        start_time=started,
        end_time=job.end_time,
        elapsed_seconds=running_elapsed(job, now),
        alloc_tres=dict(job.alloc_tres),
        tag=job_tag(job),
        expected_start=expected,
    )


def to_usage(job: SlurmJob) -> UsageRecord | None:
    """A usage record for a settled accounting job; None when a required field is missing."""
    if not settled(job) or job.submit_time is None or not job.account or not job.user:
        return None
    return UsageRecord(
        job_id=job.job_id,
        account=job.account,
        username=job.user,
        partition=job.partition,
        state=translate(job.states),
        raw_state=raw_state(job),
        submit_time=job.submit_time,
        start_time=job.start_time,
        end_time=job.end_time,
        elapsed_seconds=job.elapsed_seconds or 0,
        alloc_tres=dict(job.alloc_tres),
        tag=job_tag(job),
        name=job.name,
        global_id=job.sluid,
        array_job_id=job.array.array_job_id if job.array else None,
        array_task_id=job.array.task if job.array else None,
    )


def newest(records: Iterable[SlurmJob]) -> SlurmJob | None:
    """The record with the latest submit time (a requeued job has several)."""
    best: SlurmJob | None = None
    for record in records:
        if best is None or _submit_key(record) >= _submit_key(best):
            best = record
    return best


def _submit_key(job: SlurmJob) -> float:
    return job.submit_time.timestamp() if job.submit_time else 0.0
