"""slurmrestd ``v0.0.44`` (Slurm 26.05): no change in the fields the adapter uses."""

from __future__ import annotations

from typing import ClassVar

from adapters.slurm_rest.layers.v0043 import V0043


class V0044(V0043):
    """``v0.0.44``."""

    version: ClassVar[str] = "v0.0.44"
