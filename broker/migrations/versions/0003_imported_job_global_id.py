"""imported jobs keep the scheduler's globally unique job id (Slurm 26.05 sluid)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 12:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('imported_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('global_id', sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint('uq_imported_job_global_id', ['cluster_id', 'global_id'])


def downgrade() -> None:
    with op.batch_alter_table('imported_jobs', schema=None) as batch_op:
        batch_op.drop_constraint('uq_imported_job_global_id', type_='unique')
        batch_op.drop_column('global_id')
