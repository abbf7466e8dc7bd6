"""``slurm_ssh``: Slurm's CLI (sbatch, squeue, sacct, scancel) over pooled SSH.

See :mod:`adapters.slurm_ssh.adapter` for behaviour and
:mod:`adapters.slurm_ssh.settings` for the connection settings.
"""

from adapters.slurm_ssh.adapter import SlurmSSHAdapter

__all__ = ["SlurmSSHAdapter"]
