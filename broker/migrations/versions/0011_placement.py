"""placement: partition classes per cluster, why a job landed where it did

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 05:05:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('clusters') as batch:
        batch.add_column(sa.Column('partition_classes', sa.JSON(), nullable=False, server_default='{}'))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('placement', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('placement')
    with op.batch_alter_table('clusters') as batch:
        batch.drop_column('partition_classes')
