"""array tasks: when a cancel was asked for (Slurm keeps no record of a task cancelled before it started)

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 08:45:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job_tasks') as batch:
        batch.add_column(sa.Column('cancel_requested_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job_tasks') as batch:
        batch.drop_column('cancel_requested_at')
