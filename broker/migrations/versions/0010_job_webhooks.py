"""per-job notifications: a job's webhook and its deliveries

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 05:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_webhooks',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('url', sa.String(length=2000), nullable=False),
        sa.Column('secret', sa.String(length=256), nullable=False),
        sa.Column('states', sa.JSON(), nullable=False),
        sa.Column('planned_event_id', sa.BigInteger(), nullable=False),
        sa.Column('active', sa.Boolean(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id'),
    )
    op.create_index(op.f('ix_job_webhooks_active'), 'job_webhooks', ['active'])
    op.create_table(
        'job_webhook_deliveries',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('webhook_id', sa.Integer(), nullable=False),
        sa.Column('event_id', sa.BigInteger(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
        sa.Column('last_status_code', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.String(length=2000), nullable=True),
        sa.Column('delivered_at', sa.DateTime(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['event_id'], ['job_events.id']),
        sa.ForeignKeyConstraint(['webhook_id'], ['job_webhooks.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('webhook_id', 'event_id', name='uq_job_delivery_event'),
    )
    op.create_index('ix_job_deliveries_status_due', 'job_webhook_deliveries', ['status', 'next_attempt_at'])
    op.create_index(op.f('ix_job_webhook_deliveries_webhook_id'), 'job_webhook_deliveries', ['webhook_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_job_webhook_deliveries_webhook_id'), table_name='job_webhook_deliveries')
    op.drop_index('ix_job_deliveries_status_due', table_name='job_webhook_deliveries')
    op.drop_table('job_webhook_deliveries')
    op.drop_index(op.f('ix_job_webhooks_active'), table_name='job_webhooks')
    op.drop_table('job_webhooks')
