"""Logic shared by the Slurm adapters (ssh, rest, pyslurm): state table, TRES, tags."""
