"""Broker job states (**contract**) and which of them are terminal."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """The broker's job states; scheduler states map onto these per adapter."""

    ACCEPTED = "ACCEPTED"
    """Reserved and recorded by the broker; not yet confirmed on the cluster."""
    PENDING = "PENDING"
    """Queued on the cluster."""
    RUNNING = "RUNNING"
    """Running on the cluster."""
    COMPLETING = "COMPLETING"
    """Finished, the scheduler is cleaning up."""
    COMPLETED = "COMPLETED"
    """Ended with exit code 0."""
    FAILED = "FAILED"
    """Ended with a non-zero exit code or a node failure."""
    CANCELLED = "CANCELLED"
    """Cancelled by the user, an admin or the scheduler."""
    TIMEOUT = "TIMEOUT"
    """Killed at its time limit."""
    SUBMIT_FAILED = "SUBMIT_FAILED"
    """The cluster refused the job; nothing ran, nothing is charged."""
    UNKNOWN = "UNKNOWN"
    """The cluster cannot be reached; the last known state is kept aside."""


TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.SUBMIT_FAILED}
)
ACTIVE_STATES = frozenset(
    {JobState.ACCEPTED, JobState.PENDING, JobState.RUNNING, JobState.COMPLETING, JobState.UNKNOWN}
)
