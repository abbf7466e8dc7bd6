"""``pyslurm.constants`` (the part used)."""

UNLIMITED = "UNLIMITED"
