"""Slurm's refusals (stderr text, exit codes) → the broker's AdapterError classes.

One table, first match wins. Codes are stable strings the API and the tracker
can rely on; ``transient`` says whether retrying later may help. Messages keep
Slurm's own words (first line, cut to 300 characters) for the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterUnreachable,
    SubmitOutcomeUnknown,
    SubmitRejected,
)

__all__ = [
    "SubmitFailureRule",
    "cancel_failure",
    "query_failure",
    "slurm_message",
    "submit_failure",
]

@dataclass(frozen=True)
class SubmitFailureRule:
    """A stderr pattern and the error it becomes."""

    pattern: re.Pattern[str]
    code: str
    kind: type[AdapterError]
    transient: bool = False

    def build(self, message: str) -> AdapterError:
        """The error for a matching message."""
        return self.kind(message, code=self.code, transient=self.transient)


def _rule(
    regex: str, code: str, kind: type[AdapterError] = SubmitRejected, transient: bool = False
) -> SubmitFailureRule:
    return SubmitFailureRule(re.compile(regex, re.IGNORECASE), code, kind, transient)


#: sbatch stderr → error. Order matters: specific before general.
SUBMIT_RULES: tuple[SubmitFailureRule, ...] = (
    _rule(r"invalid account or account/partition combination", "invalid_account"),
    _rule(r"invalid account", "invalid_account"),
    _rule(r"invalid partition (name )?specified|invalid partition", "invalid_partition"),
    _rule(r"not permitted to use this partition|access denied to partition", "invalid_partition"),
    _rule(r"invalid qos specification|invalid qos", "invalid_qos"),
    _rule(r"requested time limit is invalid", "invalid_time_limit"),
    _rule(r"accounting/qos policy|qosmax|assocmax|assocgrp|qosgrp|exceeds? .*limit", "qos_limit"),
    _rule(r"invalid generic resource|invalid gres|gres specification", "invalid_gres"),
    _rule(r"requested node configuration is not available", "resources_unavailable"),
    _rule(r"memory specification can not be satisfied", "resources_unavailable"),
    _rule(r"node count specification invalid|more processors requested", "resources_unavailable"),
    _rule(r"does not look like a batch script|first line must start with", "invalid_script"),
    _rule(r"invalid user id|user not found", "invalid_user"),
    _rule(r"access/permission denied|permission denied", "permission_denied"),
    _rule(r"mkdir: cannot create|cannot create directory", "output_dir_unavailable"),
    _rule(
        r"socket timed out|timed out on send/recv",
        "scheduler_timeout",
        SubmitOutcomeUnknown,
        transient=True,
    ),
    _rule(
        r"temporarily unable to accept job|resource temporarily unavailable|try again later",
        "scheduler_busy",
        ClusterUnreachable,
        transient=True,
    ),
    _rule(
        r"unable to contact slurm controller|connection refused|unable to connect",
        "controller_unreachable",
        ClusterUnreachable,
        transient=True,
    ),
)

_COMMAND_NOT_FOUND = 127
_SCANCEL_DENIED = 210


def slurm_message(stderr: str, fallback: str) -> str:
    """The most telling line of a Slurm stderr (``error:`` lines preferred)."""
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    chosen = (errors or lines or [fallback])[-1]
    return chosen[:300]


def submit_failure(exit_status: int, stderr: str) -> AdapterError:
    """The error for a failed ``sbatch`` (exit status != 0, or no job id).

    Unknown refusals become ``SubmitRejected(code="submit_rejected")``;
    a missing ``sbatch`` is a configuration error.
    """
    message = slurm_message(stderr, f"sbatch failed with exit status {exit_status}")
    if exit_status == _COMMAND_NOT_FOUND:
        detail = f"sbatch not found on the login node: {message}"
        return AdapterConfigError(detail, code="slurm_not_found")
    for rule in SUBMIT_RULES:
        if rule.pattern.search(stderr or ""):
            return rule.build(message)
    return SubmitRejected(message, code="submit_rejected")


def cancel_failure(exit_status: int, stderr: str) -> AdapterError | None:
    """The error for a failed ``scancel``; None when the job is already gone
    (Slurm's ``Invalid job id`` / ``already completing or completed``)."""
    text = (stderr or "").lower()
    if "invalid job id" in text or "already complet" in text or "job has already finished" in text:
        return None
    message = slurm_message(stderr, f"scancel failed with exit status {exit_status}")
    if exit_status == _SCANCEL_DENIED or "permission denied" in text:
        return SubmitRejected(message, code="permission_denied")
    return query_failure("scancel", exit_status, stderr)


def query_failure(what: str, exit_status: int, stderr: str) -> AdapterError:
    """The error for a failed read-only command (squeue, sacct, sinfo...)."""
    message = f"{what}: {slurm_message(stderr, f'exit status {exit_status}')}"
    text = (stderr or "").lower()
    if exit_status == _COMMAND_NOT_FOUND:
        return AdapterConfigError(message, code="slurm_not_found")
    if "permission denied" in text or "access denied" in text:
        return AdapterError(message, code="permission_denied", transient=False)
    return ClusterUnreachable(message, code="scheduler_error")
