"""clusters: the scheduler identity discovered at registration and the usage-import watermark

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 04:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scheduler_identity', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('usage_imported_until', sa.DateTime(), nullable=True))
        batch_op.create_index(batch_op.f('ix_clusters_scheduler_identity'), ['scheduler_identity'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_clusters_scheduler_identity'))
        batch_op.drop_column('usage_imported_until')
        batch_op.drop_column('scheduler_identity')
