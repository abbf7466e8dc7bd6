"""Database tables (SQLModel). Schema changes happen only through Alembic migrations
(``broker/migrations``).

Budget amounts are stored as integers in **micro-units** (1 GPU-hour = 1 000 000)
so that balance arithmetic and the atomic ``remaining >= estimate`` check are exact
on every database; the API converts to decimal numbers.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import JSON, Field, SQLModel

MICRO = 1_000_000


def utcnow() -> datetime:
    return datetime.now(UTC)


def pk(row: Any) -> int:
    """The primary key of a flushed row (SQLModel types ids as optional)."""
    value = row.id
    if value is None:
        raise ValueError(f"{type(row).__name__} has no id yet: flush it first")
    return int(value)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as naive UTC, returned timezone-aware (SQLite keeps no zone)."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _ts(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable, index=index)


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=255, unique=True, index=True)
    email: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen_at: datetime | None = _ts()


class Cluster(SQLModel, table=True):
    __tablename__ = "clusters"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    adapter: str = Field(max_length=64)
    description: str = Field(default="", max_length=1000)
    connection: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    cost_model: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    default_partition: str | None = Field(default=None, max_length=64)
    poll_interval_seconds: float = 10.0
    partitions: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    #: placement (``cluster: auto``): partition class → this cluster's partition
    #: (``{"gpu": "boost_usr_prod"}``); a class not listed means the same-named partition
    partition_classes: dict[str, str] = Field(default_factory=dict, sa_type=JSON)
    state: str = Field(default="online", max_length=16)
    health_ok: bool | None = None
    health_detail: str | None = Field(default=None, max_length=2000)
    health_checked_at: datetime | None = _ts()
    unreachable_since: datetime | None = _ts()
    last_poll_at: datetime | None = _ts()
    #: Slurm-native enforcement: the tracker mirrors allocations into Slurm's accounting
    enforce_budgets: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    #: the last sync / drift check (plan size, when applied, last error)
    enforcement_status: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    #: which scheduler this definition reaches (``slurm:<ClusterName>@<controller>``),
    #: discovered at registration: definitions sharing it import each job once
    scheduler_identity: str | None = Field(default=None, max_length=255, index=True)
    #: usage import watermark: accounting records that ended before this were imported
    usage_imported_until: datetime | None = _ts()
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Project(SQLModel, table=True):
    __tablename__ = "projects"
    id: int | None = Field(default=None, primary_key=True)
    code: str = Field(max_length=64, unique=True, index=True)
    title: str = Field(max_length=500)
    status: str = Field(default="active", max_length=16)
    access_mode: str = Field(default="playground", max_length=64)
    start_date: date | None = None
    end_date: date | None = None
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Allocation(SQLModel, table=True):
    __tablename__ = "allocations"
    __table_args__ = (
        sa.CheckConstraint("reserved >= 0", name="ck_alloc_reserved_nonneg"),
        sa.CheckConstraint("charged >= 0", name="ck_alloc_charged_nonneg"),
    )
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="projects.id", index=True)
    cluster_id: int = Field(foreign_key="clusters.id", index=True)
    unit: str = Field(max_length=32)
    granted: int = Field(default=0, sa_type=sa.BigInteger)
    charged: int = Field(default=0, sa_type=sa.BigInteger)
    reserved: int = Field(default=0, sa_type=sa.BigInteger)
    start_date: date | None = None
    end_date: date | None = None
    account: str = Field(max_length=64)
    thresholds: list[float] = Field(default_factory=lambda: [80.0, 95.0, 100.0], sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Membership(SQLModel, table=True):
    __tablename__ = "memberships"
    __table_args__ = (sa.UniqueConstraint("project_id", "user_id", name="uq_membership"),)
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="projects.id", index=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    role: str = Field(default="member", max_length=16)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ClusterAccount(SQLModel, table=True):
    __tablename__ = "cluster_accounts"
    __table_args__ = (sa.UniqueConstraint("user_id", "cluster_id", name="uq_cluster_account"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    cluster_id: int = Field(foreign_key="clusters.id", index=True)
    username: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        sa.Index("ix_jobs_cluster_state", "cluster_id", "state"),
        sa.Index("ix_jobs_project_state", "project_id", "state"),  # eligibility's active-job counts
        # the job list's pages, newest first, each read in index order and bounded by its
        # size (services/jobs.py _list_statement): a user's own jobs, a project's, all
        sa.Index("ix_jobs_user_created_id", "user_id", "created_at", "id"),
        sa.Index("ix_jobs_project_created_id", "project_id", "created_at", "id"),
        sa.Index("ix_jobs_created_id", "created_at", "id"),
    )
    id: str = Field(primary_key=True, max_length=32)
    project_id: int = Field(foreign_key="projects.id")
    cluster_id: int = Field(foreign_key="clusters.id")
    user_id: int = Field(foreign_key="users.id")  # indexed by ix_jobs_user_created_id
    allocation_id: int = Field(foreign_key="allocations.id", index=True)
    name: str = Field(max_length=255)
    partition: str | None = Field(default=None, max_length=64)
    request: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    username: str = Field(max_length=64)
    account: str = Field(max_length=64)
    state: str = Field(default="ACCEPTED", max_length=16)
    raw_state: str | None = Field(default=None, max_length=64)
    scheduler_job_id: str | None = Field(default=None, max_length=64, index=True)
    unit: str = Field(max_length=32)
    estimated: int = Field(default=0, sa_type=sa.BigInteger)
    reserved: int = Field(default=0, sa_type=sa.BigInteger)
    charged: int | None = Field(default=None, sa_type=sa.BigInteger)
    elapsed_seconds: int | None = None
    alloc_tres: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    exit_code: int | None = None
    reason: str | None = Field(default=None, max_length=2000)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    submitted_at: datetime | None = _ts()
    started_at: datetime | None = _ts()
    ended_at: datetime | None = _ts()
    settled_at: datetime | None = _ts()
    unknown_since: datetime | None = _ts()
    last_polled_at: datetime | None = _ts()
    submit_attempted_at: datetime | None = _ts()
    #: what the scheduler says while the job waits (Slurm ``Reason``: Resources,
    #: Priority, AssocGrpGRESMinutes...) and its projected start; cleared at start
    pending_reason: str | None = Field(default=None, max_length=128)
    expected_start_at: datetime | None = _ts()
    #: ``cluster: auto``: why this cluster (policy, every candidate with its estimate,
    #: expected start and denials); None for a job sent to a named cluster
    placement: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    #: an array job: its tasks counted by state (``{"PENDING": 2, "COMPLETED": 1}``),
    #: kept with the aggregate state so that reading a job needs no task query
    array_counts: dict[str, Any] | None = Field(default=None, sa_type=JSON)


class JobTask(SQLModel, table=True):
    """One task of an array job (``--array``): its own scheduler id, state and money.

    The job's row holds the aggregate (state derived from the tasks, the sum of
    what is still reserved and what was charged); each task's share of the
    reservation is released, and its usage charged, when that task ends."""

    __tablename__ = "job_tasks"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "task", name="uq_job_task"),
        # eligibility counts an active array's tasks that have not ended per submission
        sa.Index("ix_job_tasks_job_state", "job_id", "state"),
    )
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", max_length=32)
    task: int
    #: ``<array id>_<task>`` once the array reached the scheduler
    scheduler_job_id: str | None = Field(default=None, max_length=64)
    state: str = Field(default="ACCEPTED", max_length=16)
    raw_state: str | None = Field(default=None, max_length=64)
    reserved: int = Field(default=0, sa_type=sa.BigInteger)
    charged: int | None = Field(default=None, sa_type=sa.BigInteger)
    elapsed_seconds: int | None = None
    alloc_tres: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    exit_code: int | None = None
    reason: str | None = Field(default=None, max_length=2000)
    started_at: datetime | None = _ts()
    ended_at: datetime | None = _ts()
    settled_at: datetime | None = _ts()
    #: when its cancel (of the task or the whole array) was asked for: a task cancelled
    #: before it started leaves no record in Slurm (queue nor accounting), so the
    #: tracker ends it itself once the scheduler has not reported it for a while
    cancel_requested_at: datetime | None = _ts()


class ImportedJob(SQLModel, table=True):
    """A job found in a cluster's accounting that the broker did not submit."""

    __tablename__ = "imported_jobs"
    __table_args__ = (
        sa.UniqueConstraint("cluster_id", "scheduler_job_id", "submit_time", name="uq_imported_job"),
        # Slurm 26.05+ sluid: unique over the cluster's whole history (NULL elsewhere)
        sa.UniqueConstraint("cluster_id", "global_id", name="uq_imported_job_global_id"),
    )
    id: int | None = Field(default=None, primary_key=True)
    cluster_id: int = Field(foreign_key="clusters.id")
    allocation_id: int = Field(foreign_key="allocations.id", index=True)
    scheduler_job_id: str = Field(max_length=64)
    global_id: str | None = Field(default=None, max_length=64)
    submit_time: datetime = Field(sa_type=UTCDateTime)
    account: str = Field(max_length=64)
    username: str = Field(max_length=64)
    user_id: int | None = Field(default=None, foreign_key="users.id")
    partition: str | None = Field(default=None, max_length=64)
    state: str = Field(max_length=16)
    elapsed_seconds: int = 0
    alloc_tres: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    charged: int = Field(default=0, sa_type=sa.BigInteger)
    end_time: datetime | None = _ts()
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DashboardSession(SQLModel, table=True):
    """A dashboard login, kept server-side so that logout and role changes revoke it
    (the cookie only names it)."""

    __tablename__ = "dashboard_sessions"
    id: str = Field(primary_key=True, max_length=64)
    user_name: str = Field(max_length=255, index=True)
    roles: list[str] = Field(default_factory=list, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_reason: str | None = Field(default=None, max_length=64)


class IdempotencyRecord(SQLModel, table=True):
    __tablename__ = "idempotency_records"
    __table_args__ = (sa.UniqueConstraint("user_id", "key", name="uq_idempotency"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id")
    key: str = Field(max_length=255)
    request_hash: str = Field(max_length=64)
    state: str = Field(default="in_progress", max_length=16)
    #: the request holding an in-progress claim, and until when: a claim whose lease
    #: ran out (its holder crashed) is taken over by the next retry
    owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    #: the job this key created, written in the same transaction as the job row
    #: (before the scheduler sees anything), so a retry can answer it
    job_id: str | None = Field(default=None, max_length=64)
    response_status: int | None = None
    response_body: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)


class LedgerEntry(SQLModel, table=True):
    """Append-only: every change of an allocation's balance is one row."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        # one reserve, one release, one charge per job (per array task: ``task``; -1 for
        # the whole job): settlement happens once
        sa.UniqueConstraint("job_id", "task", "kind", name="uq_ledger_job_task_kind"),
        sa.Index("ix_ledger_alloc_created", "allocation_id", "created_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    allocation_id: int = Field(foreign_key="allocations.id")
    project_id: int = Field(foreign_key="projects.id", index=True)
    kind: str = Field(max_length=16)
    amount: int = Field(sa_type=sa.BigInteger)
    job_id: str | None = Field(default=None, foreign_key="jobs.id", max_length=32)
    #: the array task a release/charge row settles; -1: the whole job (never NULL, so
    #: the unique constraint holds on every database)
    task: int = Field(default=-1, sa_column_kwargs={"server_default": "-1"})
    imported_job_id: int | None = Field(default=None, foreign_key="imported_jobs.id", unique=True)
    user_id: int | None = Field(default=None, foreign_key="users.id")
    actor: str = Field(max_length=255)
    reason: str = Field(default="", max_length=2000)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    #: when the usage happened (job end) — what usage reports group by
    occurred_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)


class Notification(SQLModel, table=True):
    """One threshold crossing or expiry warning of an allocation — recorded once.

    ``kind`` is ``threshold`` (``level`` = percent used crossed) or ``expiry``
    (``level`` = days before the allocation's end date). The unique constraint makes
    each crossing exist once, whatever the number of replicas noticing it.
    """

    __tablename__ = "notifications"
    __table_args__ = (sa.UniqueConstraint("allocation_id", "kind", "level", name="uq_notification_crossing"),)
    id: int | None = Field(default=None, primary_key=True)
    allocation_id: int = Field(foreign_key="allocations.id", index=True)
    project_id: int = Field(foreign_key="projects.id", index=True)
    kind: str = Field(max_length=16)
    level: float
    message: str = Field(max_length=2000)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)


class DeliveryState(SQLModel):
    """The retry state of one webhook delivery (quota webhooks and per-job ones)."""

    #: pending → delivered | failed (gave up after the configured attempts)
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=2000)
    delivered_at: datetime | None = _ts()
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class WebhookDelivery(DeliveryState, table=True):
    """A notification sent to one configured webhook URL, with its retry state."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.UniqueConstraint("notification_id", "endpoint", name="uq_delivery_endpoint"),
        sa.Index("ix_deliveries_status_due", "status", "next_attempt_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    notification_id: int = Field(foreign_key="notifications.id", index=True)
    #: the endpoint's configured name (never its secret)
    endpoint: str = Field(max_length=64)
    url: str = Field(max_length=2000)


class JobEvent(SQLModel, table=True):
    """One transition of a job (state, or what the scheduler says while it waits), in
    commit order: ``id`` is what event streams resume from (``Last-Event-ID``).
    Written only through :mod:`broker.events` (which keeps ids in commit order)."""

    __tablename__ = "job_events"
    __table_args__ = (
        sa.Index("ix_job_events_job_id", "job_id", "id"),
        sa.Index("ix_job_events_project_id", "project_id", "id"),
    )
    id: int | None = Field(default=None, primary_key=True,
                           sa_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"))
    job_id: str = Field(foreign_key="jobs.id", max_length=32)
    project_id: int = Field(foreign_key="projects.id")
    user_id: int = Field(foreign_key="users.id")
    state: str = Field(max_length=16)
    previous_state: str | None = Field(default=None, max_length=16)
    pending_reason: str | None = Field(default=None, max_length=128)
    occurred_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class JobWebhook(SQLModel, table=True):
    """A job's own notification URL (``notify`` at submission): which transitions to
    announce, signed with the submitter's secret (never shown back)."""

    __tablename__ = "job_webhooks"
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", max_length=32, unique=True)
    url: str = Field(max_length=2000)
    secret: str = Field(max_length=256)
    #: job states to announce; ``TERMINAL`` = whichever end state
    states: list[str] = Field(default_factory=list, sa_type=JSON)
    #: the job events up to this id have been planned (or skipped)
    planned_event_id: int = Field(default=0, sa_type=sa.BigInteger)
    active: bool = Field(default=True, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class JobWebhookDelivery(DeliveryState, table=True):
    """One announced transition of a job to its webhook, with its retry state."""

    __tablename__ = "job_webhook_deliveries"
    __table_args__ = (
        sa.UniqueConstraint("webhook_id", "event_id", name="uq_job_delivery_event"),
        sa.Index("ix_job_deliveries_status_due", "status", "next_attempt_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    webhook_id: int = Field(foreign_key="job_webhooks.id", index=True)
    event_id: int = Field(foreign_key="job_events.id", sa_type=sa.BigInteger)
    state: str = Field(max_length=16)
