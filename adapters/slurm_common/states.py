"""Slurm job states → broker states: one table, a docstring per state.

Slurm reports base states (``squeue``/``sacct``) sometimes followed by flags
(``CANCELLED by 1000``, lists like ``["RUNNING", "COMPLETING"]`` on 23.02+);
:func:`translate` takes any of those shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from broker.states import JobState

SLURM_STATES: dict[str, JobState] = {
    # Queued, waiting for resources or priority.
    "PENDING": JobState.PENDING,
    # Held, or requeued and waiting again: still queued from the user's view.
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    # Configuring nodes before start: not yet running.
    "CONFIGURING": JobState.PENDING,
    # Running.
    "RUNNING": JobState.RUNNING,
    # Suspended or stopped by an admin/preemption: allocated, counts as running.
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    # Resizing: still running.
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.COMPLETING,
    # Ended, cleanup under way.
    "COMPLETING": JobState.COMPLETING,
    # Ended with exit code zero.
    "COMPLETED": JobState.COMPLETED,
    # Ended non-zero.
    "FAILED": JobState.FAILED,
    # A node failed under the job.
    "NODE_FAIL": JobState.FAILED,
    # Ran out of memory.
    "OUT_OF_MEMORY": JobState.FAILED,
    # Could not start (bad working directory, launch failure).
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.TIMEOUT,
    # Killed at its time limit.
    "TIMEOUT": JobState.TIMEOUT,
    # Cancelled by the user or an admin.
    "CANCELLED": JobState.CANCELLED,
    # Preempted and not requeued.
    "PREEMPTED": JobState.CANCELLED,
    # Federation revoked this sibling: the job ran elsewhere.
    "REVOKED": JobState.CANCELLED,
    # Special exit state, held by the scheduler.
    "SPECIAL_EXIT": JobState.FAILED,
}

#: the end states usage import asks slurmdbd for (``sacct --state`` / slurmdb ``state``):
#: with states given, slurmdbd selects jobs by their *end* time in the window
#: (``_state_time_string``), not by when they were eligible or running.
#: The same list as ``slurm_ssh``'s ``TERMINAL_STATE_CODES`` (CA,CD,DL,F,NF,OOM,PR,TO,BF).
ACCOUNTING_END_STATES = (
    "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
    "BOOT_FAIL",
)

_TERMINAL_RAW = {
    "COMPLETED", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "TIMEOUT", "CANCELLED", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
}


def base_state(raw: str | Iterable[str]) -> str:
    """The base state word from ``"CANCELLED by 0"``, ``["RUNNING","COMPLETING"]``...

    With a list, a terminal base state wins over flags such as COMPLETING.
    """
    if isinstance(raw, str):
        words = [raw.split()[0].upper()] if raw.strip() else ["UNKNOWN"]
    else:
        words = [str(w).split()[0].upper() for w in raw if str(w).strip()] or ["UNKNOWN"]
    for w in words:
        if w in _TERMINAL_RAW:
            return w
    for w in words:
        if w in SLURM_STATES:
            return w
    return words[0]


def translate(raw: str | Iterable[str]) -> JobState:
    """Broker state for a Slurm state; an unknown word maps to UNKNOWN."""
    return SLURM_STATES.get(base_state(raw), JobState.UNKNOWN)


def is_terminal(raw: str | Iterable[str]) -> bool:
    """True when the Slurm state is an end state."""
    return base_state(raw) in _TERMINAL_RAW


def started_or_expected(
    state: JobState, start: datetime | None
) -> tuple[datetime | None, datetime | None]:
    """``(start_time, expected_start)`` from Slurm's one ``start_time`` field.

    For a pending job Slurm's ``start_time`` is the scheduler's projection (what
    ``squeue --start`` prints; unset until the backfill scheduler computed one),
    not a start: it must never become the job's ``started_at``.
    """
    if state is JobState.PENDING:
        return None, start
    return start, None
