"""Slurm errors reported by slurmrestd → the broker's adapter exceptions.

slurmrestd reports problems in an ``errors`` list, in any HTTP status: 200
(the list must still be read), 500 (22.05 and 24.11) or 422 (26.05). Each item
carries an ``error_number`` (Slurm's errno) and/or a text (``error`` or
``description``). One table classifies them by number first, text second, into
a stable ``code`` and a transient flag; the context (submit or not) picks the
exception class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterUnreachable,
    SubmitOutcomeUnknown,
    SubmitRejected,
)


@dataclass(frozen=True)
class SlurmError:
    """One item of a slurmrestd ``errors`` list."""

    number: int | None
    text: str
    source: str | None = None

    def __str__(self) -> str:
        prefix = f"[{self.number}] " if self.number else ""
        return f"{prefix}{self.text}" if self.text else prefix.strip() or "unknown Slurm error"


@dataclass(frozen=True)
class ErrorKind:
    """How one class of Slurm error is reported to the broker."""

    code: str
    kind: str  # "reject" | "unreachable" | "busy" | "config" | "gone" | "empty" | "other"
    #: a timeout/receive failure after the request left: a submit may have happened
    maybe_done: bool = False


# (error numbers, lower-case text fragments, kind). Numbers from slurm_errno.h.
_RULES: tuple[tuple[frozenset[int], tuple[str, ...], ErrorKind], ...] = (
    # ESLURM_REST_EMPTY_RESULT: 22.05 answers a query that matches nothing (a new
    # accounting database, a job slurmdbd has not recorded yet) with this *error* in a
    # 200 answer; 24.11/26.05 answer the same query with a *warning* ("... found
    # nothing"). Both mean: no records.
    (frozenset({9003}), ("nothing found",), ErrorKind("empty_result", "empty")),
    (frozenset({2045}), ("invalid account",), ErrorKind("invalid_account", "reject")),
    (
        frozenset({2000, 2001}),
        ("invalid partition", "no partition specified"),
        ErrorKind("invalid_partition", "reject"),
    ),
    (frozenset(), ("invalid qos",), ErrorKind("invalid_qos", "reject")),
    (
        frozenset({2050}),
        ("accounting/qos policy", "qos policy", "job violates accounting"),
        ErrorKind("qos_limit", "reject"),
    ),
    (frozenset({2051}), ("time limit",), ErrorKind("invalid_time_limit", "reject")),
    (
        frozenset({2014, 2015, 2005, 2006}),
        (
            "requested node configuration is not available",
            "requested partition configuration not available",
            "invalid generic resource",
            "invalid gres",
            "more processors requested than permitted",
            "node count specification invalid",
        ),
        ErrorKind("resources_unavailable", "reject"),
    ),
    (frozenset({2009}), ("batch script",), ErrorKind("invalid_script", "reject")),
    (frozenset({2017}), ("invalid job id",), ErrorKind("job_not_found", "gone")),
    (
        frozenset({2021}),
        ("already completing or completed", "already done"),
        ErrorKind("job_already_done", "gone"),
    ),
    (
        frozenset({2002}),
        ("access/permission denied", "permission denied"),
        ErrorKind("permission_denied", "reject"),
    ),
    (
        frozenset({1007}),
        ("authentication", "invalid authentication", "unable to authenticate"),
        ErrorKind("auth_failed", "config"),
    ),
    (
        frozenset({5004, 1802, 1003}),
        ("socket timed out", "timed out on send/recv", "receive failure"),
        ErrorKind("scheduler_timeout", "unreachable", maybe_done=True),
    ),
    (
        frozenset({1000, 1001, 1800, 1801, 1803}),
        (
            "unable to contact slurm controller",
            "connect failure",
            "communication connection",
            # 22.05 GET jobs while slurmctld is down: "[-1] Failed while looking for jobs"
            "failed while looking for",
        ),
        ErrorKind("cluster_unavailable", "unreachable"),
    ),
    (
        frozenset({7000}),
        ("unable to connect to database",),
        ErrorKind("accounting_unavailable", "unreachable"),
    ),
    (
        frozenset({11, 2027}),
        ("resource temporarily unavailable", "try again", "standby mode"),
        ErrorKind("scheduler_busy", "busy"),
    ),
)

_DEFAULT = ErrorKind("cluster_error", "other")


def errors_in(body: Any) -> list[SlurmError]:
    """The ``errors`` list of a slurmrestd response body (empty when none)."""
    if not isinstance(body, Mapping):
        return []
    items = body.get("errors")
    if not isinstance(items, list):
        return []
    found: list[SlurmError] = []
    for item in items:
        if isinstance(item, Mapping):
            found.append(_one_error(item))
        elif isinstance(item, str) and item:
            found.append(SlurmError(None, item))
    return found


def _one_error(item: Mapping[str, Any]) -> SlurmError:
    number = item.get("error_number", item.get("error_code"))
    if isinstance(number, bool) or not isinstance(number, int) or number == 0:
        number = None
    texts = [item.get(k) for k in ("description", "error")]
    text = "; ".join(dict.fromkeys(t for t in texts if isinstance(t, str) and t))
    source = item.get("source")
    return SlurmError(number, text, source if isinstance(source, str) else None)


def without_empty_results(errors: Sequence[SlurmError]) -> list[SlurmError]:
    """``errors`` minus the "nothing found" reports (an empty result, not a failure)."""
    return [e for e in errors if classify(e).kind != "empty"]


def classify(error: SlurmError) -> ErrorKind:
    """The kind of one Slurm error (by number, then by text)."""
    if error.number is not None:
        for numbers, _, kind in _RULES:
            if error.number in numbers:
                return kind
    lowered = error.text.lower()
    for _, fragments, kind in _RULES:
        if any(f in lowered for f in fragments):
            return kind
    return _DEFAULT


def primary(errors: Sequence[SlurmError]) -> tuple[SlurmError, ErrorKind]:
    """The error that decides the outcome: the first one that is not unclassified."""
    for error in errors:
        kind = classify(error)
        if kind is not _DEFAULT:
            return error, kind
    return errors[0], _DEFAULT


def to_exception(
    errors: Sequence[SlurmError], *, during: str, submitting: bool = False, http_status: int = 200
) -> AdapterError:
    """The adapter exception for a response carrying ``errors``."""
    _, kind = primary(errors)
    message = f"slurmrestd {during}: {'; '.join(str(e) for e in errors)}"
    if http_status >= 500 and kind is _DEFAULT and not submitting:
        return AdapterError(message, transient=True, code="cluster_error")
    return exception_for(kind, message, submitting=submitting)


def exception_for(kind: ErrorKind, message: str, *, submitting: bool) -> AdapterError:
    """Map one classified error to the exception class the broker expects."""
    if kind.kind == "unreachable":
        if submitting and kind.maybe_done:
            return SubmitOutcomeUnknown(message)
        return ClusterUnreachable(message, code=kind.code)
    if kind.kind == "busy":
        return ClusterUnreachable(message, code=kind.code)
    if kind.kind == "config":
        return AdapterConfigError(message, code=kind.code)
    if submitting:
        return SubmitRejected(message, code=kind.code if kind is not _DEFAULT else None)
    return AdapterError(message, transient=False, code=kind.code)
