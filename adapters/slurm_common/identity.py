"""The identity of a Slurm cluster, the same whichever adapter reaches it."""

from __future__ import annotations


def slurm_identity(cluster_name: str | None, controller: str | None) -> str | None:
    """``slurm:<ClusterName>@<primary controller host>`` or None without a cluster name.

    ``controller`` may carry an address (``vm(127.0.0.1)``, as ``SlurmctldHost``
    prints it); only the host name counts (slurmrestd's ``ping`` reports that)."""
    if not cluster_name:
        return None
    host = (controller or "").split("(", 1)[0].strip() or "?"
    return f"slurm:{cluster_name}@{host}"
