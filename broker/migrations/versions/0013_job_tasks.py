"""array jobs: one row per task (state, exit code, reserved, charged); ledger rows per task

The ledger's one-settlement-per-job constraint becomes one per (job, task, kind):
``task`` is -1 for a whole job (never NULL, so the constraint holds everywhere) and
the task id for an array task's release and charge.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 08:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_tasks',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('task', sa.Integer(), nullable=False),
        sa.Column('scheduler_job_id', sa.String(length=64), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('raw_state', sa.String(length=64), nullable=True),
        sa.Column('reserved', sa.BigInteger(), nullable=False),
        sa.Column('charged', sa.BigInteger(), nullable=True),
        sa.Column('elapsed_seconds', sa.Integer(), nullable=True),
        sa.Column('alloc_tres', sa.JSON(), nullable=False),
        sa.Column('exit_code', sa.Integer(), nullable=True),
        sa.Column('reason', sa.String(length=2000), nullable=True),
        sa.Column('started_at', sa.DateTime(), nullable=True),
        sa.Column('ended_at', sa.DateTime(), nullable=True),
        sa.Column('settled_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'task', name='uq_job_task'),
    )
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('array_counts', sa.JSON(), nullable=True))
    with op.batch_alter_table('ledger_entries') as batch:
        batch.add_column(sa.Column('task', sa.Integer(), nullable=False, server_default='-1'))
        batch.drop_constraint('uq_ledger_job_kind', type_='unique')
        batch.create_unique_constraint('uq_ledger_job_task_kind', ['job_id', 'task', 'kind'])


def downgrade() -> None:
    with op.batch_alter_table('ledger_entries') as batch:
        batch.drop_constraint('uq_ledger_job_task_kind', type_='unique')
        batch.create_unique_constraint('uq_ledger_job_kind', ['job_id', 'kind'])
        batch.drop_column('task')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('array_counts')
    op.drop_table('job_tasks')
