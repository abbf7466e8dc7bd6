"""index jobs (project_id, state): eligibility counts a project's active jobs per submission

Without it the count filters the project's whole job history (through
ix_jobs_project_created), which grows without bound.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 05:15:00
"""
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_project_state', 'jobs', ['project_id', 'state'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_project_state', table_name='jobs')
