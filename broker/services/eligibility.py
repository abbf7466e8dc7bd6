"""Builds the eligibility context for a request and runs the configured chain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from broker import directives, plugins
from broker.config import Settings
from broker.cost import MAX_MICRO, allocation_tres, cost_micro, partition_misfit
from broker.directives import EffectiveRequest, UnsupportedDirective
from broker.errors import DirectiveRefused, Forbidden, InvalidRequest
from broker.models import Allocation, Cluster, ClusterAccount, Job, Project, User
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
from broker.services.common import membership_role, to_units, today
from broker.states import ACTIVE_STATES


@dataclass
class Prepared:
    """A request resolved against the database: what to reserve and submit."""

    project: Project
    cluster: Cluster | None
    cluster_name: str
    partition: str
    allocation: Allocation | None
    account_username: str | None
    denials: list[Denial]
    estimate: int
    role: str | None
    #: the effective request (JSON over the script's directives); None only when
    #: the request could not be resolved far enough to build it
    request: EffectiveRequest | None = None


def load_chain(names: list[str]) -> list[EligibilityPolicy]:
    return [plugins.load_policy_class(name)() for name in names]


def _allocation_today(session: Session, project: Project, cluster: Cluster | None) -> tuple[Allocation | None, bool]:
    if cluster is None:
        return None, False
    allocs = session.exec(select(Allocation).where(
        Allocation.project_id == project.id, Allocation.cluster_id == cluster.id)).all()
    day = today()
    valid = [a for a in allocs if (a.start_date is None or a.start_date <= day)
             and (a.end_date is None or day <= a.end_date)]
    valid.sort(key=lambda a: a.id or 0, reverse=True)
    return (valid[0] if valid else None), bool(allocs)


def _resolve_cluster(session: Session, project: Project, body: JobRequest) -> tuple[Cluster | None, str]:
    if body.cluster is not None:
        return session.exec(select(Cluster).where(Cluster.name == body.cluster)).first(), body.cluster
    cluster_ids = select(Allocation.cluster_id).where(Allocation.project_id == project.id)
    clusters = session.exec(select(Cluster).where(col(Cluster.id).in_(cluster_ids))).all()
    if len(clusters) == 1:
        return clusters[0], clusters[0].name
    if not clusters:
        return None, "(none)"
    names = ", ".join(sorted(c.name for c in clusters))
    raise InvalidRequest(f"Project {project.code} has allocations on several clusters ({names}): "
                         "say which one in `cluster`.")


def _active_counts(session: Session, project: Project, user: User) -> tuple[int, int]:
    """Active jobs of the user and of the project, in one query (index on project, state)."""
    active = [s.value for s in ACTIVE_STATES]
    table = Job.__table__  # type: ignore[attr-defined]
    by_project, by_user = session.execute(
        sa.select(sa.func.count(), sa.func.count().filter(table.c.user_id == user.id))
        .where(table.c.project_id == project.id, table.c.state.in_(active))
    ).one()
    return int(by_user), int(by_project)


def _check_partition(cluster: Cluster | None, partition: str, req: EffectiveRequest) -> dict[str, Any] | None:
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


def estimate_micro(cluster: Cluster, unit: str, partition: str, part: dict[str, Any] | None,
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
    session: Session, *, settings: Settings, user: User, project: Project, body: JobRequest,
    is_quota_manager: bool,
) -> Prepared:
    """Resolve the request and run every policy of the chain (all denials kept).

    The caller has already checked the project is visible (else 404)."""
    role = membership_role(session, project, user)
    if role is None:
        raise Forbidden(f"You are not a member of {project.code}; only members submit jobs.")
    if len(body.script.encode()) > settings.max_script_bytes:
        raise InvalidRequest(f"The script is larger than {settings.max_script_bytes} bytes.")
    req = effective(body)
    if req.time_limit_minutes > settings.max_time_limit_minutes:
        raise InvalidRequest(f"time_limit_minutes may be at most {settings.max_time_limit_minutes}.")
    cluster, cluster_name = _resolve_cluster(session, project, body)
    partition = req.partition or (cluster.default_partition if cluster else None) or "default"
    part = _check_partition(cluster, partition, req)
    try:
        req = directives.with_partition_defaults(req, part)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    allocation, any_alloc = _allocation_today(session, project, cluster)
    if allocation is not None:
        try:
            req = directives.check_account(req, allocation.account)
        except UnsupportedDirective as exc:
            raise DirectiveRefused(f"Script line {exc.line}: {exc.text.strip()} — {exc.reason}",
                                   line=exc.line, directive=exc.text.strip()) from None
    account = cluster and session.exec(select(ClusterAccount).where(
        ClusterAccount.user_id == user.id, ClusterAccount.cluster_id == cluster.id)).first()
    by_user, by_project = _active_counts(session, project, user)
    ctx = EligibilityContext(
        today=today(), user=user.name,
        project=ProjectView(project.code, project.status, project.access_mode, project.start_date,
                            project.end_date, project.attributes),
        allocation=_alloc_view(allocation, cluster_name), allocations_on_cluster_exist=any_alloc,
        cluster_account=account.username if account else None,
        request=_request_view(cluster_name, partition, req, part),
        limits=_limits(settings, project.access_mode), active_jobs_user=by_user,
        active_jobs_project=by_project,
    )
    denials = [d for policy in load_chain(settings.eligibility_chain)
               if (d := policy.check(ctx)) is not None]
    misfit = partition_misfit(nodes=req.nodes, cpus_per_node=req.ntasks_per_node * req.cpus_per_task,
                              gpus_per_node=req.gpus_per_node, memory_per_node_mb=req.memory_per_node_mb,
                              partition=part)
    if misfit is not None:
        denials.append(Denial("exceeds_partition", f"The request cannot fit partition {partition}: {misfit}."))
    estimate = 0
    if cluster is not None and allocation is not None:
        estimate = estimate_micro(cluster, allocation.unit, partition, part, req)
    return Prepared(project, cluster, cluster_name, partition, allocation,
                    account.username if account else None, denials, estimate, role, req)


def _request_view(cluster: str, partition: str, req: EffectiveRequest, part: dict[str, Any] | None) -> JobRequestView:
    """What policies see: the effective request, ``--exclusive`` as the whole nodes
    Slurm will give."""
    gpus, cpt, tpn = req.gpus_per_node, req.cpus_per_task, req.ntasks_per_node
    if req.exclusive and part:
        gpus = max(gpus, int(part.get("gpus_per_node") or 0))
    return JobRequestView(cluster, partition, req.nodes, tpn, cpt, gpus, req.memory_per_node_mb,
                          req.time_limit_minutes, array_tasks=req.tasks, exclusive=req.exclusive)


def _alloc_view(a: Allocation | None, cluster_name: str) -> AllocationView | None:
    if a is None:
        return None
    return AllocationView(a.id or 0, cluster_name, a.unit, to_units(a.granted) or 0.0,
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
