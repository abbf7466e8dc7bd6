"""slurmrestd ``v0.0.41`` (Slurm 24.11).

Same shapes as v0.0.40 for everything the adapter reads and writes (number
objects are inline schemas instead of references; the submit response adds a
``result`` object, read by the shared job-id reader).
"""

from __future__ import annotations

from typing import ClassVar

from adapters.slurm_rest.layers.v0040 import V0040


class V0041(V0040):
    """Slurm 24.11's ``v0.0.41``."""

    version: ClassVar[str] = "v0.0.41"
