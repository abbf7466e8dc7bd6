"""index jobs for the job list: (user_id, created_at, id), (project_id, created_at, id), (created_at, id)

GET /v1/jobs reads each page newest first as a UNION ALL of bounded index scans (a
user's own jobs, each led project's jobs, or all jobs for a quota manager), so a page
reads about its own size of rows, not every visible job sorted. The (user_id, ...)
index replaces ix_jobs_user_id, the (project_id, ...) one ix_jobs_project_created
on (project_id, created_at) — each a prefix of its successor: a job gains one index.

Plain CREATE INDEX, not CONCURRENTLY: the migration runner (broker/migrate.py) runs
every revision in one transaction under its advisory lock, where PostgreSQL refuses
CONCURRENTLY. The build holds a SHARE lock on jobs (reads go on, writes wait): about
0.4 s per 200,000 jobs for the three (measured, PostgreSQL 15). An installation with many millions of jobs can
build them beforehand with CREATE INDEX CONCURRENTLY under these names; the
migration then finds them (IF NOT EXISTS) and only drops the two they replace.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30 20:30:00
"""
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None

_NEW = [
    ('ix_jobs_user_created_id', ['user_id', 'created_at', 'id']),
    ('ix_jobs_project_created_id', ['project_id', 'created_at', 'id']),
    ('ix_jobs_created_id', ['created_at', 'id']),
]


def upgrade() -> None:
    for name, columns in _NEW:
        op.create_index(name, 'jobs', columns, unique=False, if_not_exists=True)
    op.drop_index('ix_jobs_project_created', table_name='jobs')
    op.drop_index('ix_jobs_user_id', table_name='jobs')


def downgrade() -> None:
    op.create_index('ix_jobs_user_id', 'jobs', ['user_id'], unique=False)
    op.create_index('ix_jobs_project_created', 'jobs', ['project_id', 'created_at'], unique=False)
    for name, _ in reversed(_NEW):
        op.drop_index(name, table_name='jobs')
