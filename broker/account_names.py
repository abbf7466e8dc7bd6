"""Scheduler account names, compared the way Slurm compares them.

Slurm folds account names to lower case: ``sacctmgr add account AIFA-X`` creates
``aifa-x``, ``sbatch --account=AIFA-X`` runs under ``aifa-x``, and squeue, sacct and
slurmdb report ``aifa-x``. The broker therefore stores an allocation's account in
that form (the API answers it so), and compares any account a scheduler or a script
reports through :func:`canonical_account`: an account written in another case is the
same account — for adoption, usage attribution, the "one account, one project" rule
and a script's ``--account`` — never a different one.
"""

from __future__ import annotations


def canonical_account(name: str) -> str:
    """The form in which the broker stores and compares a scheduler account name."""
    return name.lower()
