"""Placement: ``cluster: auto`` — run where the job starts soonest within budget.

Three steps (docs/placement.md):

1. :func:`gather` (database only): every cluster where the project holds an
   allocation is a candidate. The request's partition is a *class* mapped to the
   cluster's partition by its ``partition_classes``; the whole eligibility chain,
   the cost in that allocation's unit and the remaining budget are computed per
   candidate, and clusters that are draining, offline or behind an open circuit
   breaker are denied without being contacted.
2. :func:`probe` (no database): the expected start of each still-eligible
   candidate from its adapter (``sbatch --test-only``, a queue-depth estimate...),
   all at once, each bounded by ``placement_probe_seconds``.
3. :func:`choose` (pure): the configured policy ranks the eligible candidates.

Only the chosen candidate's allocation is reserved (by the ordinary submission
path); the record of every candidate is kept on the job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from broker.adapter import AdapterError, ClusterAdapter, ClusterUnreachable, JobSpec, StartEstimate
from broker.config import Settings
from broker.cost import MAX_MICRO
from broker.directives import EffectiveRequest
from broker.errors import InvalidRequest
from broker.models import Allocation, Cluster, Project, User, utcnow
from broker.policy import Denial
from broker.registry import AdapterRegistry
from broker.schemas import CandidateOut, DenialOut, JobRequest, Money, PlacementOut
from broker.services.clusters import adapter_for, breaker_retry_after
from broker.services.common import to_units
from broker.services.eligibility import effective, load_subject, prepare

log = logging.getLogger(__name__)

AUTO = "auto"
POLICIES = ("earliest_start", "lowest_share")


@dataclass(frozen=True)
class ProbeInput:
    """The effective request and identity a candidate's expected start is asked with."""

    request: EffectiveRequest
    username: str
    account: str


@dataclass
class Candidate:
    """One cluster considered for a job; ``denials`` empty means eligible."""

    cluster: str
    partition: str | None
    denials: list[Denial] = field(default_factory=list)
    unit: str | None = None
    estimate: int = 0
    remaining: int | None = None
    start: datetime | None = None
    method: str | None = None
    detail: str | None = None
    #: the request as it would be sent to this cluster (cluster and partition set)
    body: JobRequest | None = None
    #: what the expected start is asked for (set for eligible candidates by gather)
    probe: ProbeInput | None = None
    #: the job as the adapter would be given it (built by the caller from ``probe``)
    spec: JobSpec | None = None
    cluster_id: int = 0
    #: the probe could not connect: the caller opens the cluster's circuit breaker
    unreachable: bool = False

    @property
    def eligible(self) -> bool:
        return not self.denials

    @property
    def share(self) -> float | None:
        """The part of the remaining budget this job would take (0..1]."""
        if self.remaining is None or self.remaining <= 0:
            return None
        return self.estimate / self.remaining

    def out(self) -> CandidateOut:
        def money(v: int | None) -> Money | None:
            return None if v is None or self.unit is None else Money(unit=self.unit, amount=to_units(v) or 0.0)

        return CandidateOut(
            cluster=self.cluster, partition=self.partition, eligible=self.eligible,
            denials=[DenialOut(code=d.code, detail=d.detail) for d in self.denials],
            estimated_cost=money(self.estimate if self.unit else None), remaining=money(self.remaining),
            budget_share=None if self.share is None else round(self.share, 6),
            expected_start=self.start, start_method=self.method, start_detail=self.detail)


@dataclass
class Placement:
    policy: str
    candidates: list[Candidate]
    chosen: Candidate | None
    reason: str

    def out(self) -> PlacementOut:
        return PlacementOut(policy=self.policy, chosen=self.chosen.cluster if self.chosen else None,
                            reason=self.reason, candidates=[c.out() for c in self.candidates])

    def record(self) -> dict[str, Any]:
        """What is stored on the job (JSON)."""
        return self.out().model_dump(mode="json")


# --- 1. gather --------------------------------------------------------------------------

def partition_for(cluster: Cluster, wanted: str | None) -> str | None:
    """The cluster's partition for a requested partition class: its mapping, else
    the same name; no class: the cluster's default partition."""
    if wanted is None:
        return cluster.default_partition
    return (cluster.partition_classes or {}).get(wanted, wanted)


def _project_clusters(session: Session, project: Project) -> list[Cluster]:
    ids = select(Allocation.cluster_id).where(Allocation.project_id == project.id)
    return list(session.exec(select(Cluster).where(col(Cluster.id).in_(ids)).order_by(col(Cluster.name))).all())


def gather(
    session: Session, *, settings: Settings, registry: AdapterRegistry, user: User, project: Project,
    body: JobRequest, is_quota_manager: bool,
) -> tuple[list[Candidate], dict[str, ClusterAdapter]]:
    """Every candidate with its eligibility, cost and remaining budget (no cluster contacted)."""
    wanted = effective(body).partition  # the class: JSON over #SBATCH, as for a named cluster
    candidates: list[Candidate] = []
    adapters: dict[str, ClusterAdapter] = {}
    invalid: list[InvalidRequest] = []
    for cluster in _project_clusters(session, project):
        partition = partition_for(cluster, wanted)
        update: dict[str, Any] = {"cluster": cluster.name}
        if partition is not None:
            update["partition"] = partition
        concrete = body.model_copy(update=update)
        cand = Candidate(cluster.name, partition, body=concrete, cluster_id=cluster.id or 0)
        candidates.append(cand)
        try:
            subject = load_subject(session, user=user.name, project=project.code, cluster=cluster.name)
            assert subject is not None  # the caller loaded both
            prep = prepare(session, settings=settings, subject=subject, body=concrete,
                           is_quota_manager=is_quota_manager)
        except InvalidRequest as exc:  # e.g. no such partition there, longer than its limit
            invalid.append(exc)
            cand.denials.append(Denial(exc.code if exc.code != "validation_error" else "no_partition",
                                       exc.detail))
            continue
        cand.partition = prep.partition
        cand.denials.extend(prep.denials)
        alloc = prep.allocation
        if alloc is not None:
            cand.unit, cand.estimate = alloc.unit, prep.estimate
            cand.remaining = alloc.granted - alloc.charged - alloc.reserved
            if prep.estimate >= MAX_MICRO:
                cand.denials.append(Denial("request_too_large", "The estimate is larger than the broker can "
                                                                "account for."))
            elif prep.estimate > cand.remaining:
                cand.denials.append(Denial("quota_exceeded", "The allocation has less budget left "
                                           f"({to_units(cand.remaining) or 0:g} {alloc.unit}) than this job's "
                                           f"estimate ({to_units(prep.estimate) or 0:g} {alloc.unit})."))
        if cluster.state != "online":
            cand.denials.append(Denial(f"cluster_{cluster.state}", f"Cluster {cluster.name} is {cluster.state}; "
                                       "skipped, not waited on."))
        elif breaker_retry_after(cluster) is not None:
            cand.denials.append(Denial("cluster_unreachable", f"Cluster {cluster.name} does not answer "
                                       f"({cluster.health_detail}); skipped, not waited on."))
        if cand.eligible and prep.request is not None and prep.account_username and alloc is not None:
            cand.probe = ProbeInput(prep.request, prep.account_username, alloc.account)
            adapters[cluster.name] = adapter_for(registry, cluster)
    if invalid and len(invalid) == len(candidates) and len({e.code for e in invalid}) == 1 \
            and invalid[0].code != "validation_error":
        raise invalid[0]  # the request itself is wrong (a refused directive...): 422, not "nowhere"
    return candidates, adapters


# --- 2. probe ---------------------------------------------------------------------------

def _ask(adapter: ClusterAdapter, spec: JobSpec) -> StartEstimate | None:
    return adapter.expected_start(spec)


def probe(candidates: Sequence[Candidate], adapters: dict[str, ClusterAdapter], *, timeout: float) -> None:
    """Fill in each eligible candidate's expected start, all clusters at once.

    A scheduler that refuses the request outright denies the candidate
    (``scheduler_refused``); one that cannot be reached denies it too
    (``cluster_unreachable``); one slower than ``timeout`` keeps it with an unknown
    start (method ``timeout``) — it ranks after every known start."""
    todo = [c for c in candidates if c.eligible and c.spec is not None and c.cluster in adapters]
    if not todo:
        return
    pool = ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="placement")
    try:
        futures = {c.cluster: pool.submit(_ask, adapters[c.cluster], c.spec) for c in todo if c.spec}
        deadline = utcnow().timestamp() + timeout
        for cand in todo:
            try:
                answer = futures[cand.cluster].result(timeout=max(0.0, deadline - utcnow().timestamp()))
            except FutureTimeout:
                cand.method, cand.detail = "timeout", f"no answer within {timeout:g} s"
                continue
            except AdapterError as exc:
                code = "cluster_unreachable" if exc.transient else "scheduler_refused"
                cand.denials.append(Denial(code, f"Cluster {cand.cluster}: {exc}"))
                cand.unreachable = isinstance(exc, ClusterUnreachable)
                continue
            except Exception as exc:  # an adapter bug must not fail the placement of others
                log.exception("placement probe of %s failed", cand.cluster)
                cand.method, cand.detail = "none", f"probe failed: {type(exc).__name__}"
                continue
            if answer is None:
                cand.method, cand.detail = "none", "the adapter cannot tell when a job would start"
            else:
                cand.start, cand.method, cand.detail = answer.start, answer.method, answer.detail[:300]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a slow cluster is never waited on


# --- 3. choose --------------------------------------------------------------------------

def _start_key(c: Candidate, tolerance: float, origin: datetime) -> float:
    if c.start is None:
        return float("inf")
    seconds = max(0.0, (c.start - origin).total_seconds())
    return seconds // tolerance if tolerance > 0 else seconds


def _share_key(c: Candidate) -> float:
    return c.share if c.share is not None else float("inf")


def choose(candidates: Sequence[Candidate], *, policy: str, tolerance_seconds: float = 60.0,
           now: datetime | None = None) -> Candidate | None:
    """The eligible candidate the policy ranks first (ties: cluster name), or None.

    ``earliest_start``: earliest expected start (starts within ``tolerance_seconds``
    of each other count as equal; unknown starts last), then the lowest share of
    the remaining budget. ``lowest_share``: the other way round."""
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r} (known: {', '.join(POLICIES)})")
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        return None
    origin = now or utcnow()

    def key(c: Candidate) -> tuple[float, float, str]:
        start, share = _start_key(c, tolerance_seconds, origin), _share_key(c)
        return (start, share, c.cluster) if policy == "earliest_start" else (share, start, c.cluster)

    return min(eligible, key=key)


def explain(chosen: Candidate | None, candidates: Sequence[Candidate], policy: str) -> str:
    """One sentence a user can read: where and why, and why not elsewhere."""
    others = []
    for c in candidates:
        if c is chosen:
            continue
        if c.denials:
            others.append(f"{c.cluster}: {c.denials[0].code} ({c.denials[0].detail})")
        else:
            others.append(f"{c.cluster}: eligible, start {_when(c)}, budget share {_pct(c)}")
    if chosen is None:
        return "No cluster can take this job — " + "; ".join(others) if others else \
            "No cluster can take this job: the project has no allocation on any cluster."
    first = ("earliest expected start, then lowest share of the remaining budget" if policy == "earliest_start"
             else "lowest share of the remaining budget, then earliest expected start")
    head = (f"{chosen.cluster} ({chosen.partition}) by {policy} ({first}): start {_when(chosen)}, "
            f"budget share {_pct(chosen)}")
    return head + (". Others — " + "; ".join(others) if others else ". No other candidate.")


def _when(c: Candidate) -> str:
    if c.start is None:
        return f"unknown ({c.method or 'not probed'})"
    return f"{c.start:%Y-%m-%dT%H:%M:%S}Z ({c.method})"


def _pct(c: Candidate) -> str:
    return "n/a" if c.share is None else f"{c.share:.1%}"


def plan(
    candidates: list[Candidate], adapters: dict[str, ClusterAdapter], *, settings: Settings,
) -> Placement:
    """Probe and choose (no database session may be open: probes take seconds)."""
    probe(candidates, adapters, timeout=settings.placement_probe_seconds)
    chosen = choose(candidates, policy=settings.placement_policy,
                    tolerance_seconds=settings.placement_start_tolerance_seconds)
    return Placement(settings.placement_policy, candidates, chosen,
                     explain(chosen, candidates, settings.placement_policy))


def ranked(placement: Placement, *, settings: Settings) -> list[Candidate]:
    """The eligible candidates in the policy's order (the chosen one first): the
    submission falls back to the next when the budget moved meanwhile."""
    rest = [c for c in placement.candidates if c.eligible]
    order: list[Candidate] = []
    while rest:
        best = choose(rest, policy=settings.placement_policy,
                      tolerance_seconds=settings.placement_start_tolerance_seconds)
        assert best is not None
        order.append(best)
        rest.remove(best)
    return order
