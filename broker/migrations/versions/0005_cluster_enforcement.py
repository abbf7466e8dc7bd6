"""clusters: Slurm-native budget enforcement switch and last sync status

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 04:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enforce_budgets', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('enforcement_status', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.drop_column('enforcement_status')
        batch_op.drop_column('enforce_budgets')
