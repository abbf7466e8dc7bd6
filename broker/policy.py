"""The policy plugin contract: eligibility checks and the cost model.

Policies see plain, frozen views of the domain (no database, no FastAPI). An
eligibility policy returns ``None`` (allow) or a :class:`Denial` with a stable
``code`` (one of the design's 403 codes) and a sentence a human understands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

__all__ = [
    "AccessModeLimits",
    "AllocationView",
    "Denial",
    "EligibilityContext",
    "EligibilityPolicy",
    "JobRequestView",
    "ProjectView",
]


@dataclass(frozen=True)
class Denial:
    """Why a job may not run: a stable ``code`` and a human ``detail``."""

    code: str
    detail: str


@dataclass(frozen=True)
class ProjectView:
    code: str
    status: str
    access_mode: str
    start_date: date | None
    end_date: date | None
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AllocationView:
    id: int
    cluster: str
    unit: str
    granted: float
    charged: float
    reserved: float
    start_date: date | None
    end_date: date | None
    account: str

    @property
    def remaining(self) -> float:
        return self.granted - self.charged - self.reserved


@dataclass(frozen=True)
class JobRequestView:
    cluster: str
    partition: str
    nodes: int
    ntasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    memory_per_node_mb: int | None
    time_limit_minutes: int
    #: tasks of an ``--array`` job (1 otherwise); limits apply per task
    array_tasks: int = 1
    #: ``--exclusive``: whole nodes (``gpus_per_node`` already counts all of a node's GPUs)
    exclusive: bool = False


@dataclass(frozen=True)
class AccessModeLimits:
    """Limits a site configures per access mode; ``None`` means no limit."""

    allowed_partitions: tuple[str, ...] | None = None
    max_nodes: int | None = None
    max_gpus_per_job: int | None = None
    max_time_minutes: int | None = None
    max_concurrent_jobs_per_user: int | None = None
    max_concurrent_jobs_per_project: int | None = None


@dataclass(frozen=True)
class EligibilityContext:
    """Everything an eligibility policy may look at for one request."""

    today: date
    user: str
    project: ProjectView
    allocation: AllocationView | None
    allocations_on_cluster_exist: bool
    cluster_account: str | None
    request: JobRequestView
    limits: AccessModeLimits
    #: the caller's / the project's active jobs, counted as Slurm's job limits count:
    #: a plain job is one, an array counts each of its tasks that has not ended.
    #: None: not counted, because no policy of the chain reads them for this request
    #: (see :class:`EligibilityPolicy`); a policy that does not say so always gets them
    active_jobs_user: int | None
    active_jobs_project: int | None


class EligibilityPolicy(Protocol):
    """One link of the eligibility chain.

    A policy may also say whether it reads ``ctx.active_jobs_user`` /
    ``ctx.active_jobs_project`` with an attribute ``reads_active_jobs``: a bool, or a
    method taking the request's :class:`AccessModeLimits`. Counting reads every
    active job of the project, so the broker counts only when a policy of the chain
    reads them; a policy without the attribute is assumed to read them."""

    name: str

    def check(self, ctx: EligibilityContext) -> Denial | None: ...
