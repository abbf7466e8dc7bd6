"""slurmrestd ``v0.0.42`` (Slurm 24.11 and 26.05 — the only version both serve).

Changes from v0.0.41: ping items gain ``responding`` (bool) and ``primary``;
``slurmdb/ping`` exists (used for the accounting health check); the submit
response no longer has ``result``; ``DELETE job`` answers carry a ``status``
list whose items report per-job signal failures (``error.code``/``message``);
26.05's accounting adds ``stdout_expanded``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from adapters.slurm_common import shapes as fields
from adapters.slurm_rest.layers.base import text
from adapters.slurm_rest.layers.v0041 import V0041
from adapters.slurm_rest.model import PingResult


class V0042(V0041):
    """``v0.0.42``."""

    version: ClassVar[str] = "v0.0.42"
    cancel_needs_check: ClassVar[bool] = False

    @property
    def db_health_path(self) -> str:
        """``slurmdb/ping/`` (cheaper than diag)."""
        return self._slurmdb("ping/")

    def cancel_failures(self, body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """``status[].error`` items with a non-zero code, as ``errors`` items."""
        failures: list[Mapping[str, Any]] = []
        for item in self.items(body, "status"):
            error = item.get("error")
            if not isinstance(error, Mapping):
                continue
            code = fields.as_int(error.get("code"))
            if code:
                message = text(error.get("message")) or text(error.get("string")) or ""
                failures.append({"error_number": code, "error": message})
        return failures

    def parse_ping(self, item: Mapping[str, Any]) -> PingResult:
        """``responding`` (bool) is authoritative; ``pinged`` is the fallback."""
        responding = item.get("responding")
        up = responding if isinstance(responding, bool) else (str(item.get("pinged", "")).upper() == "UP")
        return PingResult(
            hostname=text(item.get("hostname")) or "?",
            up=up,
            latency_us=fields.as_int(item.get("latency")),
        )
