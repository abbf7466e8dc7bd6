"""store scheduler account names in lower case, as Slurm does

Slurm folds account names (sacctmgr, sbatch --account, squeue/sacct/slurmdb answers);
the API now stores an allocation's account that way (broker.account_names). Rows
written before keep the case a quota manager typed: lower-case them, allocations and
the jobs that carry their account, so that every comparison with what the scheduler
reports (adoption, usage attribution, one account per project) sees one name.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01 03:30:00
"""
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('allocations', 'jobs'):
        op.execute(f"UPDATE {table} SET account = lower(account) WHERE account <> lower(account)")  # noqa: S608


def downgrade() -> None:
    """Nothing to undo: the case typed before cannot be known, and lower case is what Slurm uses."""
