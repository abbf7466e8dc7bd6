"""slurmrestd ``v0.0.45`` (Slurm 26.05).

Changes read here: accounting jobs carry ``sluid`` (a globally unique job id);
``standard_output`` is no longer expanded (``stdout_expanded`` is); ping items
replace ``pinged`` by ``status``; partitions report ``flags`` with ``DEFAULT``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from adapters.slurm_rest.layers.base import text
from adapters.slurm_rest.layers.v0044 import V0044


class V0045(V0044):
    """``v0.0.45``."""

    version: ClassVar[str] = "v0.0.45"

    def accounting_sluid(self, item: Mapping[str, Any]) -> str | None:
        """The job's ``sluid``."""
        return text(item.get("sluid"))

    def partition_is_default(self, item: Mapping[str, Any]) -> bool:
        """``flags`` contains ``DEFAULT``."""
        flags = item.get("flags") or []
        return any(isinstance(f, str) and f.upper() == "DEFAULT" for f in flags)
