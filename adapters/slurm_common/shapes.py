"""Scalar field shapes that differ between Slurm releases (numbers, states, exit codes).

Slurm 22.05 prints plain values; 23.02+ (data_parser) wraps many numbers as
``{"set": bool, "infinite": bool, "number": N}``, turns state words into lists
and exit codes into ``{"status": [...], "return_code": {...}, "signal": {...}}``.
These helpers accept every shape so that callers never branch on the release.
Used by the CLI (``squeue``/``sacct --json``) and the REST adapters alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "as_int",
    "as_str",
    "epoch_to_datetime",
    "exit_code",
    "is_infinite",
    "state_words",
]


def as_int(value: Any) -> int | None:
    """An integer from ``5``, ``"5"``, ``{"set": true, "number": 5}``; None when
    unset, infinite, missing or not a number."""
    if isinstance(value, Mapping):
        if not value.get("set", True) or value.get("infinite", False):
            return None
        value = value.get("number")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def is_infinite(value: Any) -> bool:
    """True for ``{"infinite": true}`` and the textual ``UNLIMITED``/``INFINITE``."""
    if isinstance(value, Mapping):
        return bool(value.get("infinite", False))
    if isinstance(value, str):
        return value.strip().upper() in {"UNLIMITED", "INFINITE"}
    return False


def as_str(value: Any) -> str | None:
    """A non-empty string or None (``""``, ``null`` and non-strings give None)."""
    if isinstance(value, str) and value:
        return value
    return None


def epoch_to_datetime(value: Any) -> datetime | None:
    """UTC datetime from an epoch field in any shape; 0/unset/unknown give None."""
    seconds = as_int(value)
    if seconds is None or seconds <= 0:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC)


def state_words(value: Any) -> list[str]:
    """State as a list of words: ``"COMPLETED"`` → ``["COMPLETED"]``, lists kept,
    sacct ``{"current": ...}`` objects unwrapped."""
    if isinstance(value, Mapping):
        value = value.get("current")
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list | tuple):
        return [str(v) for v in value if isinstance(v, str) and v.strip()]
    return []


def _signal_number(signal: Any) -> int | None:
    if not isinstance(signal, Mapping):
        return as_int(signal)
    for key in ("id", "signal_id"):
        if key in signal:
            number = as_int(signal[key])
            if number is not None:
                return number
    return None


def exit_code(value: Any) -> int | None:
    """A job's exit code as one integer, from every shape Slurm uses.

    - ``0`` / ``"0:0"`` / ``"1:0"`` (plain or ``sacct -P`` ``ExitCode``);
    - ``{"status": "SUCCESS", "return_code": 0}`` (22.05);
    - ``{"status": ["SIGNALED"], "return_code": {...}, "signal": {"id": {...}}}`` (23.02+).

    A job killed by signal N (and no non-zero return code) gives ``128 + N``, as
    a shell reports it. None when nothing is known.
    """
    if isinstance(value, str) and ":" in value:
        code_text, _, sig_text = value.partition(":")
        code, sig = as_int(code_text), as_int(sig_text)
        return _combine(code, sig)
    if not isinstance(value, Mapping):
        return as_int(value)
    code = as_int(value.get("return_code"))
    sig = _signal_number(value.get("signal"))
    statuses = state_words(value.get("status"))
    if "SIGNALED" not in [s.upper() for s in statuses] and code is not None:
        sig = None if code else sig
    return _combine(code, sig)


def _combine(code: int | None, sig: int | None) -> int | None:
    if code:
        return code
    if sig:
        return 128 + sig
    return code


def now_utc() -> datetime:
    """The current time, UTC (a seam for tests)."""
    return datetime.now(tz=UTC)
