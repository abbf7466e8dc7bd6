"""``slurm_rest``: the cluster adapter for slurmrestd (entry point ``slurm_rest``).

See :mod:`adapters.slurm_rest.adapter` for the behaviour and
:mod:`adapters.slurm_rest.settings` for the connection settings.
"""

from __future__ import annotations

from adapters.slurm_rest.adapter import SlurmRestAdapter

__all__ = ["SlurmRestAdapter"]
