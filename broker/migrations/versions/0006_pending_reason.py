"""jobs keep what the scheduler says while they wait: pending reason, expected start

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 04:10:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pending_reason', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('expected_start_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('expected_start_at')
        batch_op.drop_column('pending_reason')
