"""Cluster registry and cluster accounts (sysadmin)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from sqlmodel import Session, select

from broker.adapter import AdapterConfigError, AdapterError, ClusterAdapter, Health
from broker.auth import Principal
from broker.cost import CostModelError, validate_cost_model
from broker.errors import Conflict, InvalidRequest, NotFound
from broker.models import Allocation, Cluster, ClusterAccount, Job, User, pk, utcnow
from broker.registry import AdapterRegistry
from broker.schemas import AccountOut, ClusterIn, ClusterOut, ClusterPatch
from broker.services.admission_rows import ClusterRow
from broker.services.common import get_cluster, get_or_create_user, require_role
from broker.states import ACTIVE_STATES

log = logging.getLogger(__name__)
_SECRET_KEY = re.compile(r"(token|password|secret|passphrase)", re.IGNORECASE)


def redact(connection: dict[str, Any]) -> dict[str, Any]:
    """Connection settings with inline secrets hidden (paths to key files stay)."""
    return {
        k: ("***" if _SECRET_KEY.search(k) and not k.endswith("_file") else v)
        for k, v in connection.items()
    }


def cluster_out(cluster: Cluster, *, dev_only: bool = False) -> ClusterOut:
    return ClusterOut(
        name=cluster.name, adapter=cluster.adapter, description=cluster.description,
        state=cluster.state, default_partition=cluster.default_partition,
        poll_interval_seconds=cluster.poll_interval_seconds, partitions=cluster.partitions,
        cost_model=cluster.cost_model, connection=redact(cluster.connection),
        health_ok=cluster.health_ok, health_detail=cluster.health_detail,
        health_checked_at=cluster.health_checked_at, unreachable_since=cluster.unreachable_since,
        dev_only=dev_only or cluster.adapter == "local",
        enforce_budgets=cluster.enforce_budgets, enforcement_status=cluster.enforcement_status,
        partition_classes=dict(cluster.partition_classes or {}),
    )


def adapter_for(registry: AdapterRegistry, cluster: Cluster | ClusterRow) -> ClusterAdapter:
    return registry.get(name=cluster.name, adapter=cluster.adapter, connection=cluster.connection)


def register_cluster(
    session: Session, *, principal: Principal | None, registry: AdapterRegistry, body: ClusterIn,
    default_poll: float,
) -> Cluster:
    """Register a cluster: build its adapter, discover its partitions and which
    scheduler it reaches now, so a definition that cannot work fails here (422
    ``cluster_misconfigured`` with a sentence naming the problem), not at the first
    job: unknown adapter or connection keys, bad version or key, nothing answering,
    a ``default_partition`` or a cost-model partition the cluster does not have."""
    if principal is not None:
        require_role(principal, "sysadmin")
    try:
        validate_cost_model(body.cost_model)
    except CostModelError as exc:
        raise InvalidRequest(str(exc)) from exc
    if session.exec(select(Cluster).where(Cluster.name == body.name)).first():
        raise Conflict(f"A cluster named {body.name} exists already.", code="conflict")
    cluster = Cluster(
        name=body.name, adapter=body.adapter, description=body.description,
        connection=body.connection, cost_model=body.cost_model,
        default_partition=body.default_partition,
        poll_interval_seconds=body.poll_interval_seconds or default_poll,
        enforce_budgets=body.enforce_budgets, partition_classes=dict(body.partition_classes),
    )
    _discover_into(cluster, registry, fail_on_config=True)
    _check_partitions(cluster)
    session.add(cluster)
    session.flush()
    return cluster


def misconfigured(cluster: str, problem: str) -> InvalidRequest:
    """The 422 ``cluster_misconfigured`` answer for a definition that cannot work."""
    return InvalidRequest(f"Cluster {cluster} cannot be used: {problem}", code="cluster_misconfigured")


def _discover_into(cluster: Cluster, registry: AdapterRegistry, *, fail_on_config: bool) -> None:
    try:
        adapter = registry.build(name=cluster.name, adapter=cluster.adapter, connection=cluster.connection)
        try:
            partitions = adapter.discover()
            identity = _identity(adapter)
        finally:
            adapter.close()
    except AdapterConfigError as exc:
        if fail_on_config:
            raise misconfigured(cluster.name, str(exc)) from exc
        raise
    except AdapterError as exc:
        # nothing answering is not a definition to keep: health would never be proven
        raise misconfigured(cluster.name, f"it does not answer ({exc}); register it once it is reachable") \
            from exc
    except (TypeError, ValueError, KeyError) as exc:  # bad connection settings
        raise misconfigured(cluster.name, f"invalid connection settings: {exc}") from exc
    cluster.partitions = [asdict(p) for p in partitions]
    cluster.scheduler_identity = identity
    cluster.health_ok, cluster.health_detail = True, "discovered at registration"
    cluster.health_checked_at = utcnow()
    if cluster.default_partition is None:
        default = next((p.name for p in partitions if p.default), None)
        cluster.default_partition = default or (partitions[0].name if partitions else None)


def _identity(adapter: ClusterAdapter) -> str | None:
    try:
        return adapter.identity()
    except AdapterError as exc:  # not fatal: the definition is then its own scheduler
        log.warning("cluster %s: scheduler identity unknown: %s", adapter.name, exc)
        return None


def _check_partitions(cluster: Cluster) -> None:
    """``default_partition`` and every cost-model partition must exist on the cluster."""
    names = [str(p.get("name")) for p in cluster.partitions]
    if not names:
        return
    listed = ", ".join(names)
    if cluster.default_partition and cluster.default_partition not in names:
        raise misconfigured(cluster.name, f"default_partition {cluster.default_partition!r} does not exist "
                            f"on the cluster (its partitions: {listed})")
    unknown = sorted(set(cluster.cost_model.get("partitions", {})) - {"*", *names})
    if unknown:
        raise misconfigured(cluster.name, f"the cost model prices partition(s) {', '.join(map(repr, unknown))} "
                            f"the cluster does not have (its partitions: {listed})")
    wrong = sorted(f"{k!r} → {v!r}" for k, v in (cluster.partition_classes or {}).items() if v not in names)
    if wrong:
        raise misconfigured(cluster.name, f"partition_classes maps {', '.join(wrong)}, a partition the cluster "
                            f"does not have (its partitions: {listed})")


def scheduler_group_ids(session: Session, cluster: Cluster) -> list[int]:
    """Ids of every definition reaching the same scheduler as ``cluster`` (itself included)."""
    if not cluster.scheduler_identity:
        return [pk(cluster)]
    return [int(i) for i in session.exec(select(Cluster.id).where(
        Cluster.scheduler_identity == cluster.scheduler_identity)).all() if i is not None]


def same_scheduler(session: Session, cluster: Cluster) -> list[str]:
    """Other registered definitions that reach the same scheduler as ``cluster``."""
    if not cluster.scheduler_identity:
        return []
    return [c.name for c in session.exec(select(Cluster).where(
        Cluster.scheduler_identity == cluster.scheduler_identity, Cluster.name != cluster.name)).all()]


def check_scheduler_account(session: Session, *, registry: AdapterRegistry, cluster_name: str,
                            account: str) -> str | None:
    """Refuse a Slurm account the cluster does not have (422); a warning sentence
    where the adapter cannot tell (or the cluster cannot be asked now), else None."""
    cluster = get_cluster(session, cluster_name)
    if cluster.enforce_budgets:  # the enforcement sync creates the account in Slurm
        return None
    return _check_exists(
        registry, cluster, f"account {account!r}", lambda adapter: adapter.account_exists(account),
        missing=f"Cluster {cluster.name} has no account {account!r}: create it in the scheduler first "
                "(e.g. sacctmgr add account) or correct the name.")


def check_posix_user(session: Session, *, registry: AdapterRegistry, cluster_name: str,
                     username: str) -> str | None:
    """Refuse a POSIX user the cluster does not know (422); a warning where the
    adapter cannot tell (or the cluster cannot be asked now), else None."""
    cluster = get_cluster(session, cluster_name)
    return _check_exists(
        registry, cluster, f"user {username!r}", lambda adapter: adapter.user_exists(username),
        missing=f"Cluster {cluster.name} has no user {username!r}: create the account there first "
                "or correct the name.")


def _check_exists(registry: AdapterRegistry, cluster: Cluster, what: str,
                  probe: Callable[[ClusterAdapter], bool | None], *, missing: str) -> str | None:
    """Ask the cluster whether ``what`` exists: raise ``missing`` (422) when it does
    not; a warning sentence when it cannot tell or cannot be asked; else None."""
    try:
        exists = probe(adapter_for(registry, cluster))
    except AdapterError as exc:
        return f"could not check that {what} exists on {cluster.name}: {exc}"
    if exists is False:
        raise InvalidRequest(missing)
    if exists is None:
        return f"the {cluster.adapter} adapter cannot tell whether {what} exists on {cluster.name}"
    return None


def update_cluster(
    session: Session, *, principal: Principal | None, registry: AdapterRegistry, name: str, body: ClusterPatch,
) -> Cluster:
    """Change a cluster (``principal`` None: the operator CLI on the broker host)."""
    if principal is not None:
        require_role(principal, "sysadmin")
    cluster = get_cluster(session, name)
    changes = body.model_dump(exclude_unset=True)
    if "cost_model" in changes:
        try:
            validate_cost_model(changes["cost_model"])
        except CostModelError as exc:
            raise InvalidRequest(str(exc)) from exc
    for key, value in changes.items():
        setattr(cluster, key, value)
    if "connection" in changes:
        _discover_into(cluster, registry, fail_on_config=True)
        registry.forget(cluster.name)
    _check_partitions(cluster)
    session.add(cluster)
    return cluster


def delete_cluster(session: Session, *, principal: Principal | None, registry: AdapterRegistry, name: str) -> None:
    """Remove a cluster that has no allocations and no jobs (else 409: drain it instead)."""
    if principal is not None:
        require_role(principal, "sysadmin")
    cluster = get_cluster(session, name)
    if session.exec(select(Allocation).where(Allocation.cluster_id == cluster.id)).first() or \
            session.exec(select(Job).where(Job.cluster_id == cluster.id)).first():
        raise Conflict(f"Cluster {name} has allocations or jobs; set its state to offline instead.")
    for acct in session.exec(select(ClusterAccount).where(ClusterAccount.cluster_id == cluster.id)):
        session.delete(acct)
    session.flush()  # no relationship() orders these deletes: the accounts go first
    session.delete(cluster)
    registry.forget(name)


#: a "down" verdict older than this no longer blocks submissions (the tracker that
#: refreshes it may be gone): the next submission tries the cluster again
BREAKER_FRESH_SECONDS = 300.0


def breaker_retry_after(cluster: Cluster | ClusterRow) -> int | None:
    """Seconds to wait when the cluster's circuit breaker is open, else None.

    Open while the latest verdict — the tracker's poll or idle probe, or a submission
    that could not connect — says the cluster does not answer, and that verdict is
    fresh. Submissions then fail at once (503 ``cluster_unavailable``) instead of
    waiting for connection timeouts; the tracker's next successful probe closes it."""
    if cluster.unreachable_since is None or cluster.health_ok is not False:
        return None
    checked = cluster.health_checked_at or cluster.unreachable_since
    if (utcnow() - checked).total_seconds() > max(BREAKER_FRESH_SECONDS, 5 * cluster.poll_interval_seconds):
        return None
    return max(5, min(60, int(cluster.poll_interval_seconds * 3)))


def trip_breaker(session: Session, *, cluster_id: int, detail: str) -> None:
    """A submission could not reach the cluster: open its breaker now (the tracker
    closes it after its next successful probe)."""
    cluster = session.get(Cluster, cluster_id)
    if cluster is None:
        return
    now = utcnow()
    cluster.unreachable_since = cluster.unreachable_since or now
    cluster.health_ok, cluster.health_detail, cluster.health_checked_at = False, detail[:2000], now
    session.add(cluster)


def check_health(session: Session, *, registry: AdapterRegistry, name: str) -> Health:
    """A live check through the adapter; the result is stored on the cluster."""
    cluster = get_cluster(session, name)
    try:
        health = adapter_for(registry, cluster).health()
    except AdapterError as exc:
        health = Health(ok=False, detail=str(exc))
    cluster.health_ok, cluster.health_detail = health.ok, health.detail[:2000]
    cluster.health_checked_at = utcnow()
    session.add(cluster)
    return health


def map_account(
    session: Session, *, principal: Principal | None, cluster_name: str, user_name: str, username: str,
) -> AccountOut:
    """Map a broker user to a POSIX account on a cluster (creates the user if new)."""
    if principal is not None:
        require_role(principal, "sysadmin")
    cluster = get_cluster(session, cluster_name)
    user = get_or_create_user(session, user_name)
    acct = session.exec(
        select(ClusterAccount).where(ClusterAccount.user_id == user.id,
                                     ClusterAccount.cluster_id == cluster.id)
    ).first()
    if acct is None:
        acct = ClusterAccount(user_id=pk(user), cluster_id=pk(cluster), username=username)
    else:
        active = session.exec(select(Job).where(Job.user_id == user.id, Job.cluster_id == cluster.id,
                                                Job.state.in_([s.value for s in ACTIVE_STATES]))).first()  # type: ignore[attr-defined]
        if active and acct.username != username:
            raise Conflict("The user has active jobs under the current account; wait for them to end.")
        acct.username = username
    session.add(acct)
    return AccountOut(cluster=cluster.name, user=user.name, username=username)


def list_accounts(session: Session, *, principal: Principal, cluster_name: str) -> list[AccountOut]:
    require_role(principal, "sysadmin")
    cluster = get_cluster(session, cluster_name)
    rows = session.exec(
        select(ClusterAccount, User).join(User, User.id == ClusterAccount.user_id)  # type: ignore[arg-type]
        .where(ClusterAccount.cluster_id == cluster.id)
    ).all()
    return [AccountOut(cluster=cluster.name, user=u.name, username=a.username) for a, u in rows]


def remove_account(session: Session, *, principal: Principal, cluster_name: str, user_name: str) -> None:
    require_role(principal, "sysadmin")
    cluster = get_cluster(session, cluster_name)
    user = session.exec(select(User).where(User.name == user_name)).first()
    acct = user and session.exec(select(ClusterAccount).where(
        ClusterAccount.user_id == user.id, ClusterAccount.cluster_id == cluster.id)).first()
    if not acct:
        raise NotFound(f"{user_name} has no account on {cluster_name}.")
    session.delete(acct)
