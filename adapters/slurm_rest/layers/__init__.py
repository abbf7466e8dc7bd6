"""Translation layers, one per slurmrestd API version the adapter supports.

=========  ==============  ====================================================
version    Slurm           differences handled by the layer
=========  ==============  ====================================================
v0.0.38    22.05           plain ints, string states, env object, ``gres``
v0.0.40    24.11           number objects, list states, env list, ``tres_per_node``
v0.0.41    24.11           as v0.0.40 (submit response adds ``result``)
v0.0.42    24.11, 26.05    ping ``responding``; ``slurmdb/ping``
v0.0.43    26.05           ``stdout_expanded``
v0.0.44    26.05           as v0.0.43
v0.0.45    26.05           ``sluid``; ping ``status``; partition ``DEFAULT`` flag
=========  ==============  ====================================================
"""

from __future__ import annotations

from adapters.slurm_rest.layers.base import ApiLayer
from adapters.slurm_rest.layers.v0038 import V0038
from adapters.slurm_rest.layers.v0040 import V0040
from adapters.slurm_rest.layers.v0041 import V0041
from adapters.slurm_rest.layers.v0042 import V0042
from adapters.slurm_rest.layers.v0043 import V0043
from adapters.slurm_rest.layers.v0044 import V0044
from adapters.slurm_rest.layers.v0045 import V0045

LAYERS: dict[str, type[ApiLayer]] = {cls.version: cls for cls in (V0038, V0040, V0041, V0042, V0043, V0044, V0045)}

__all__ = ["LAYERS", "ApiLayer", "version_key"]


def version_key(version: str) -> tuple[int, ...]:
    """``"v0.0.42"`` → ``(0, 0, 42)`` for ordering; unparseable → ``()``."""
    try:
        return tuple(int(p) for p in version.lstrip("v").split("."))
    except ValueError:
        return ()
