"""slurmrestd ``v0.0.43`` (Slurm 26.05).

Changes read here: jobs carry ``stdout_expanded`` (the path with ``%j`` etc.
substituted) next to the raw ``standard_output`` pattern.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from adapters.slurm_rest.layers.base import text
from adapters.slurm_rest.layers.v0042 import V0042


class V0043(V0042):
    """``v0.0.43``."""

    version: ClassVar[str] = "v0.0.43"

    def stdout_path(self, item: Mapping[str, Any]) -> str | None:
        """``stdout_expanded`` first; the raw pattern only when it is missing."""
        return text(item.get("stdout_expanded")) or text(item.get("standard_output"))
