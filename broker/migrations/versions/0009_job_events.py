"""job events: every transition of a job, in commit order (long poll, event streams)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 04:25:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('project_id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('previous_state', sa.String(length=16), nullable=True),
        sa.Column('pending_reason', sa.String(length=128), nullable=True),
        sa.Column('occurred_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id']),
        sa.ForeignKeyConstraint(['user_id'], ['users.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_job_events_job_id', 'job_events', ['job_id', 'id'])
    op.create_index('ix_job_events_project_id', 'job_events', ['project_id', 'id'])


def downgrade() -> None:
    op.drop_index('ix_job_events_project_id', table_name='job_events')
    op.drop_index('ix_job_events_job_id', table_name='job_events')
    op.drop_table('job_events')
