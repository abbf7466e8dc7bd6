"""Cluster registry and cluster accounts (sysadmin)."""

from __future__ import annotations

import logging
import re
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
    )


def adapter_for(registry: AdapterRegistry, cluster: Cluster) -> ClusterAdapter:
    return registry.get(name=cluster.name, adapter=cluster.adapter, connection=cluster.connection)


def register_cluster(
    session: Session, *, principal: Principal | None, registry: AdapterRegistry, body: ClusterIn,
    default_poll: float,
) -> Cluster:
    """Register a cluster: build its adapter and discover its partitions now, so a
    definition that cannot work (bad version, missing key) fails here, not at the
    first job. An unreachable cluster is registered with its health marked down."""
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
        enforce_budgets=body.enforce_budgets,
    )
    _discover_into(cluster, registry, fail_on_config=True)
    session.add(cluster)
    session.flush()
    return cluster


def _discover_into(cluster: Cluster, registry: AdapterRegistry, *, fail_on_config: bool) -> None:
    try:
        adapter = registry.build(name=cluster.name, adapter=cluster.adapter, connection=cluster.connection)
        try:
            partitions = adapter.discover()
        finally:
            adapter.close()
    except AdapterConfigError as exc:
        if fail_on_config:
            raise InvalidRequest(f"Cluster {cluster.name} cannot be used: {exc}",
                                 code="cluster_misconfigured") from exc
        raise
    except AdapterError as exc:
        cluster.health_ok, cluster.health_detail = False, f"unreachable at registration: {exc}"
        cluster.health_checked_at = utcnow()
        return
    except (TypeError, ValueError, KeyError) as exc:  # bad connection settings
        raise InvalidRequest(f"Cluster {cluster.name} has invalid connection settings: {exc}",
                             code="cluster_misconfigured") from exc
    cluster.partitions = [asdict(p) for p in partitions]
    cluster.health_ok, cluster.health_detail = True, "discovered at registration"
    cluster.health_checked_at = utcnow()
    if cluster.default_partition is None:
        default = next((p.name for p in partitions if p.default), None)
        cluster.default_partition = default or (partitions[0].name if partitions else None)


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
    session.delete(cluster)
    registry.forget(name)


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
