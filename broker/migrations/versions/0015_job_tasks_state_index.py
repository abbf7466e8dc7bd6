"""index job_tasks (job_id, state): eligibility counts an active array's unended tasks per submission

The job limits count each array task that has not ended, as Slurm does; with this
index the count of one array's live tasks reads only those (an index-only scan on
PostgreSQL), not every task of the array through uq_job_task.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30 10:45:00
"""
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_job_tasks_job_state', 'job_tasks', ['job_id', 'state'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_job_tasks_job_state', table_name='job_tasks')
