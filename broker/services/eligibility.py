"""Builds the eligibility context for a request and runs the configured chain."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from broker import directives, plugins
from broker.auth import Principal
from broker.config import Settings
from broker.cost import MAX_MICRO, allocation_tres, cost_micro, partition_misfit
from broker.direct import Statement
from broker.directives import EffectiveRequest, UnsupportedDirective
from broker.errors import DirectiveRefused, Forbidden, InvalidRequest, NotFound
from broker.models import Allocation, Cluster, ClusterAccount, Job, JobTask, Membership, Project, User
from broker.policy import (
    AccessModeLimits,
    AllocationView,
    Denial,
    EligibilityContext,
    EligibilityPolicy,
    JobRequestView,
    ProjectView,
)
from broker.schemas import JobRequest
from broker.services.admission_rows import (
    ALLOCATION_COLUMNS,
    CLUSTER_COLUMNS,
    PROJECT_COLUMNS,
    USER_COLUMNS,
    AllocationRow,
    ClusterRow,
    ProjectRow,
    UserRow,
    take,
)
from broker.services.common import get_or_create_user, to_units, today, visible_project
from broker.states import ACTIVE_STATES


@dataclass
class Prepared:
    """A request resolved against the database: what to reserve and submit."""

    project: ProjectRow
    cluster: ClusterRow | None
    cluster_name: str
    partition: str
    allocation: AllocationRow | None
    account_username: str | None
    denials: list[Denial]
    estimate: int
    role: str | None
    #: the effective request (JSON over the script's directives); None only when
    #: the request could not be resolved far enough to build it
    request: EffectiveRequest | None = None


def load_chain(names: list[str]) -> list[EligibilityPolicy]:
    return [plugins.load_policy_class(name)() for name in names]


@dataclass
class Subject:
    """Everything an admission reads about its caller, project and cluster — loaded
    by :func:`load_subject` in one statement (it was eight), as plain rows
    (broker/services/admission_rows.py)."""

    project: ProjectRow
    user: UserRow
    role: str | None
    cluster: ClusterRow | None
    cluster_name: str
    #: the project's allocations on ``cluster`` (any dates)
    allocations: list[AllocationRow] = field(default_factory=list)
    account_username: str | None = None

    def allocation_today(self) -> AllocationRow | None:
        """The newest allocation valid today."""
        day = today()
        valid = [a for a in self.allocations if (a.start_date is None or a.start_date <= day)
                 and (a.end_date is None or day <= a.end_date)]
        return max(valid, key=lambda a: a.id) if valid else None


def _active_units(*scope: Any) -> Any:
    """Active jobs matching ``scope`` counted as Slurm counts them for its job limits:
    a plain job is one, an array is as many as its tasks that have not ended (so an
    array whose tasks all ended counts none). Scalar subqueries: every active job
    counted as one (``ix_jobs_project_state``), plus, for each active array, its
    live tasks less one (``ix_job_tasks_job_state``)."""
    active = _active_state_literals()
    job = Job.__table__  # type: ignore[attr-defined]
    task = JobTask.__table__  # type: ignore[attr-defined]
    jobs = sa.select(sa.func.count()).select_from(job).where(*scope, job.c.state.in_(active)).scalar_subquery()
    live_tasks = (sa.select(sa.func.count()).select_from(task)
                  .where(task.c.job_id == job.c.id, task.c.state.in_(active)).scalar_subquery())
    # an array is a job with task rows (its lowest task: one probe of uq_job_task).
    # ``array_counts IS NOT NULL`` only narrows the rows read, and what PostgreSQL's
    # planner expects to read (a task count costed for every active job put
    # admission over jit_above_cost): a row written through the ORM with None holds
    # JSON null, which is NOT NULL in SQL
    is_array = sa.select(sa.func.min(task.c.task)).where(task.c.job_id == job.c.id).scalar_subquery().is_not(None)
    extra = (sa.select(sa.func.coalesce(sa.func.sum(sa.case((is_array, live_tasks - 1), else_=0)), 0))
             .select_from(job).where(*scope, job.c.state.in_(active), job.c.array_counts.is_not(None))
             .scalar_subquery())
    return jobs + extra


def _active_state_literals() -> list[Any]:
    """The active states as SQL constants, not a bound list: an ``IN`` over bound
    values is an expanding parameter, re-rendered into the statement on every
    execution (a measured tenth of admission's CPU). The values are the broker's
    own state names (checked to be plain upper-case words), never user input."""
    names = sorted(s.value for s in ACTIVE_STATES)
    if not all(re.fullmatch(r"[A-Z_]+", n) for n in names):
        raise ValueError(f"job state names must be upper-case words to be SQL constants: {names}")
    return [sa.literal_column(f"'{n}'") for n in names]


@functools.cache
def _subject_statement() -> Statement:
    """Built once: project by code, the caller and their membership, the cluster by
    name, the project's allocations there and the caller's account on it. Run on the
    driver's cursor on PostgreSQL (broker/direct.py)."""
    return Statement(
        sa.select(*PROJECT_COLUMNS, *USER_COLUMNS, col(Membership.role), *CLUSTER_COLUMNS, *ALLOCATION_COLUMNS,
                  col(ClusterAccount.username))
        .select_from(Project)
        .outerjoin(User, col(User.name) == sa.bindparam("me"))
        .outerjoin(Membership, sa.and_(col(Membership.project_id) == col(Project.id),
                                       col(Membership.user_id) == col(User.id)))
        .outerjoin(Cluster, col(Cluster.name) == sa.bindparam("cluster"))
        .outerjoin(Allocation, sa.and_(col(Allocation.project_id) == col(Project.id),
                                       col(Allocation.cluster_id) == col(Cluster.id)))
        .outerjoin(ClusterAccount, sa.and_(col(ClusterAccount.user_id) == col(User.id),
                                           col(ClusterAccount.cluster_id) == col(Cluster.id)))
        .where(col(Project.code) == sa.bindparam("code"))
    )


@functools.cache
def _active_jobs_statement() -> Any:
    """Built once: the caller's and the project's active jobs (:func:`_active_units`:
    array tasks one by one)."""
    job = Job.__table__  # type: ignore[attr-defined]
    project_id: sa.BindParameter[int] = sa.bindparam("project_id")
    user_id: sa.BindParameter[int] = sa.bindparam("user_id")
    return sa.select(_active_units(job.c.project_id == project_id, job.c.user_id == user_id),
                     _active_units(job.c.project_id == project_id))


def count_active_jobs(session: Session, subject: Subject) -> tuple[int, int]:
    """The caller's and the project's active jobs, each array task not yet ended
    counted as one job (as Slurm's job limits count them)."""
    mine, all_of_them = session.execute(_active_jobs_statement(), {
        "project_id": subject.project.id, "user_id": subject.user.id}).one()
    return int(mine), int(all_of_them)


def reads_active_jobs(chain: list[EligibilityPolicy], limits: AccessModeLimits) -> bool:
    """Whether a policy of ``chain`` reads the active-job counts for a request under
    ``limits``: a policy says so with ``reads_active_jobs`` (a bool, or a method
    taking the limits); one that does not say is assumed to read them. Counting
    reads every active job of the project, which grows with big sweeps: it is done
    only when something reads it."""
    for policy in chain:
        reads = getattr(policy, "reads_active_jobs", True)
        if reads(limits) if callable(reads) else reads:
            return True
    return False


def load_subject(session: Session, *, user: str, project: str, cluster: str) -> Subject | None:
    """:class:`Subject` for ``user`` submitting to ``project`` on ``cluster`` (one
    statement); None when there is no such project or no such user yet."""
    rows = _subject_statement().rows(session, {"me": user, "code": project, "cluster": cluster})
    if not rows:
        return None
    first = rows[0]
    project_row, at = take(first, 0, ProjectRow)
    user_row, at = take(first, at, UserRow)
    if user_row is None:
        return None
    role = first[at]
    cluster_row, at = take(first, at + 1, ClusterRow)
    allocations_at = at
    _, at = take(first, at, AllocationRow)
    return Subject(project=project_row, user=user_row, role=role, cluster=cluster_row, cluster_name=cluster,
                   allocations=[a for r in rows if (a := take(r, allocations_at, AllocationRow)[0]) is not None],
                   account_username=first[at])


def subject_for(session: Session, principal: Principal, body: JobRequest) -> Subject:
    """The :class:`Subject` of ``principal`` submitting ``body``: 404 when the project
    does not exist or the caller may not see it (member or quota manager); the
    caller's user row is created on first sight."""
    cluster = body.cluster
    if cluster is None:  # the project's only cluster (rare: clients name it)
        project, _ = visible_project(session, principal, body.project)
        cluster = resolve_cluster_name(session, project, body)
    subject = load_subject(session, user=principal.name, project=body.project, cluster=cluster)
    if subject is None:
        get_or_create_user(session, principal.name, principal.email)
        subject = load_subject(session, user=principal.name, project=body.project, cluster=cluster)
        if subject is None:
            raise NotFound(f"No project {body.project}.")
    if subject.role is None and not principal.is_quota_manager:
        raise NotFound(f"No project {body.project}.")
    return subject


def resolve_cluster_name(session: Session, project: Project, body: JobRequest) -> str:
    """The cluster a request goes to: the one it names, else the project's only one."""
    if body.cluster is not None:
        return body.cluster
    cluster_ids = select(Allocation.cluster_id).where(Allocation.project_id == project.id)
    names = sorted(session.exec(select(Cluster.name).where(col(Cluster.id).in_(cluster_ids))).all())
    if len(names) == 1:
        return names[0]
    if not names:
        return "(none)"
    raise InvalidRequest(f"Project {project.code} has allocations on several clusters ({', '.join(names)}): "
                         "say which one in `cluster`.")


def _check_partition(cluster: ClusterRow | None, partition: str, req: EffectiveRequest) -> dict[str, Any] | None:
    """The discovered partition (None when the cluster has not reported any)."""
    if cluster is None or not cluster.partitions:
        return None
    known = {p["name"]: p for p in cluster.partitions}
    if partition not in known:
        raise InvalidRequest(f"Cluster {cluster.name} has no partition {partition} "
                             f"(known: {', '.join(sorted(known))}).")
    max_time = known[partition].get("max_time_minutes")
    if max_time and req.time_limit_minutes > max_time:
        raise InvalidRequest(f"Partition {partition} allows at most {max_time} minutes.")
    return dict(known[partition])


def effective(body: JobRequest) -> EffectiveRequest:
    """The request the broker prices and submits: the JSON fields the client really
    sent (pydantic's ``model_fields_set``) over the script's ``#SBATCH`` lines."""
    try:
        return directives.effective_request(script=body.script, json_values=body.model_dump(),
                                            json_set=body.model_fields_set)
    except UnsupportedDirective as exc:
        raise DirectiveRefused(f"Script line {exc.line}: {exc.text.strip()} — {exc.reason}",
                               line=exc.line, directive=exc.text.strip()) from None
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def estimate_micro(cluster: ClusterRow, unit: str, partition: str, part: dict[str, Any] | None,
                   req: EffectiveRequest) -> int:
    """Cost of what Slurm will allocate for the whole request (every array task)
    held for its time limit."""
    tres = allocation_tres(nodes=req.nodes, cpus=req.cpus, gpus_per_node=req.gpus_per_node,
                           memory_per_node_mb=req.memory_per_node_mb, exclusive=req.exclusive,
                           partition=part)
    per_task = cost_micro(cluster.cost_model, partition=partition, unit=unit, tres=tres,
                          seconds=req.time_limit_minutes * 60)
    return min(per_task * req.tasks, MAX_MICRO)  # MAX_MICRO → 422 request_too_large


def prepare(
    session: Session, *, settings: Settings, subject: Subject, body: JobRequest, is_quota_manager: bool,
) -> Prepared:
    """Resolve the request against ``subject`` and run every policy of the chain (all
    denials kept). The caller has already checked the project is visible (else 404)."""
    project, user, cluster, cluster_name = subject.project, subject.user, subject.cluster, subject.cluster_name
    role = subject.role
    if role is None:
        raise Forbidden(f"You are not a member of {project.code}; only members submit jobs.")
    if len(body.script.encode()) > settings.max_script_bytes:
        raise InvalidRequest(f"The script is larger than {settings.max_script_bytes} bytes.")
    req = effective(body)
    if req.time_limit_minutes > settings.max_time_limit_minutes:
        raise InvalidRequest(f"time_limit_minutes may be at most {settings.max_time_limit_minutes}.")
    partition = req.partition or (cluster.default_partition if cluster else None) or "default"
    part = _check_partition(cluster, partition, req)
    try:
        req = directives.with_partition_defaults(req, part)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    allocation = subject.allocation_today()
    if allocation is not None:
        try:
            req = directives.check_account(req, allocation.account)
        except UnsupportedDirective as exc:
            raise DirectiveRefused(f"Script line {exc.line}: {exc.text.strip()} — {exc.reason}",
                                   line=exc.line, directive=exc.text.strip()) from None
    account = subject.account_username if cluster is not None else None
    chain = load_chain(settings.eligibility_chain)
    limits = _limits(settings, project.access_mode)
    active_user, active_project = (count_active_jobs(session, subject) if reads_active_jobs(chain, limits)
                                   else (None, None))
    ctx = EligibilityContext(
        today=today(), user=user.name,
        project=ProjectView(project.code, project.status, project.access_mode, project.start_date,
                            project.end_date, project.attributes),
        allocation=_alloc_view(allocation, cluster_name), allocations_on_cluster_exist=bool(subject.allocations),
        cluster_account=account,
        request=_request_view(cluster_name, partition, req, part),
        limits=limits, active_jobs_user=active_user, active_jobs_project=active_project,
    )
    denials = [d for policy in chain if (d := policy.check(ctx)) is not None]
    misfit = partition_misfit(nodes=req.nodes, cpus_per_node=req.ntasks_per_node * req.cpus_per_task,
                              gpus_per_node=req.gpus_per_node, memory_per_node_mb=req.memory_per_node_mb,
                              partition=part)
    if misfit is not None:
        denials.append(Denial("exceeds_partition", f"The request cannot fit partition {partition}: {misfit}."))
    estimate = 0
    if cluster is not None and allocation is not None:
        estimate = estimate_micro(cluster, allocation.unit, partition, part, req)
    return Prepared(project, cluster, cluster_name, partition, allocation, account, denials, estimate, role, req)


def _request_view(cluster: str, partition: str, req: EffectiveRequest, part: dict[str, Any] | None) -> JobRequestView:
    """What policies see: the effective request, ``--exclusive`` as the whole nodes
    Slurm will give."""
    gpus, cpt, tpn = req.gpus_per_node, req.cpus_per_task, req.ntasks_per_node
    if req.exclusive and part:
        gpus = max(gpus, int(part.get("gpus_per_node") or 0))
    return JobRequestView(cluster, partition, req.nodes, tpn, cpt, gpus, req.memory_per_node_mb,
                          req.time_limit_minutes, array_tasks=req.tasks, exclusive=req.exclusive)


def _alloc_view(a: AllocationRow | None, cluster_name: str) -> AllocationView | None:
    if a is None:
        return None
    return AllocationView(a.id, cluster_name, a.unit, to_units(a.granted) or 0.0,
                          to_units(a.charged) or 0.0, to_units(a.reserved) or 0.0,
                          a.start_date, a.end_date, a.account)


def _limits(settings: Settings, access_mode: str) -> AccessModeLimits:
    cfg = settings.access_modes.get(access_mode)
    if cfg is None:
        return AccessModeLimits()
    return AccessModeLimits(
        allowed_partitions=tuple(cfg.allowed_partitions) if cfg.allowed_partitions is not None else None,
        max_nodes=cfg.max_nodes, max_gpus_per_job=cfg.max_gpus_per_job,
        max_time_minutes=cfg.max_time_minutes,
        max_concurrent_jobs_per_user=cfg.max_concurrent_jobs_per_user,
        max_concurrent_jobs_per_project=cfg.max_concurrent_jobs_per_project,
    )
