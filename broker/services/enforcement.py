"""Slurm-native budget enforcement: the broker's allocations mirrored into Slurm.

Per cluster with ``enforce_budgets`` on, every allocation becomes (see
docs/enforcement.md for the full story):

- its **account** (``allocation.account``), under Slurm's ``root``;
- one **user association** per member of the project who has a cluster account
  there (memberships × cluster accounts → POSIX usernames);
- a **GrpTRESMins** limit on the account: for each TRES ``t`` with weight
  ``w_t > 0`` in the allocation's unit (the largest weight over the cluster's
  partitions, so Slurm never lets through more than the broker would charge),
  ``floor(60 × granted / w_t)`` minutes, summed over the account's valid
  allocations. ``granted = charged + reserved + remaining``: Slurm counts the
  usage of every job on the account itself (broker jobs and direct ``sbatch``
  alike), so its limit is what has been spent plus what is held plus what is
  left. Charges made outside the broker are therefore counted by Slurm at once,
  and reach the broker's ledger through usage import.

When an allocation ends (past its end date, or its project no longer active),
its user associations and then its account are removed; when a membership or
cluster account goes, its association goes. Only accounts that carry a broker
allocation on the cluster are ever touched.

The plan is the difference between that desired state and the cluster's
accounting (an :class:`~broker.accounting.AccountingSnapshot`); an empty plan
means no drift, and applying a plan twice changes nothing the second time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.account_names import canonical_account
from broker.accounting import AccountingChange, AccountingManager, AccountingSnapshot, valid_name
from broker.adapter import AdapterConfigError, AdapterError
from broker.auth import Principal
from broker.cost import DEFAULT_WEIGHTS, weights_for
from broker.db import session_scope
from broker.errors import ClusterUnavailable, Conflict, InvalidRequest
from broker.models import MICRO, Allocation, Cluster, ClusterAccount, Membership, Project, utcnow
from broker.registry import AdapterRegistry
from broker.services.clusters import adapter_for
from broker.services.common import get_cluster, require_role, today

log = logging.getLogger(__name__)


@dataclass
class DesiredAccount:
    """What one managed account should look like in Slurm (``active`` False: remove it)."""

    account: str
    active: bool
    grp_tres_mins: dict[str, int] = field(default_factory=dict)
    users: set[str] = field(default_factory=set)
    allocations: list[int] = field(default_factory=list)


@dataclass
class SyncReport:
    """The outcome of a sync or drift check of one cluster."""

    cluster: str
    slurm_cluster: str
    enabled: bool
    dry_run: bool
    applied: bool
    changes: list[AccountingChange]
    accounts: list[DesiredAccount]
    checked_at: str = field(default_factory=lambda: utcnow().isoformat())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (API, CLI ``--json``, stored status)."""
        return {
            "cluster": self.cluster, "slurm_cluster": self.slurm_cluster, "enabled": self.enabled,
            "dry_run": self.dry_run, "applied": self.applied, "drift": len(self.changes),
            "checked_at": self.checked_at,
            "changes": [{"action": c.action, "account": c.account, "user": c.user,
                         "grp_tres_mins": dict(c.grp_tres_mins), "reason": c.reason,
                         "describe": c.describe()} for c in self.changes],
            "accounts": [{"account": a.account, "active": a.active, "grp_tres_mins": a.grp_tres_mins,
                          "users": sorted(a.users), "allocations": a.allocations} for a in self.accounts],
        }


def tres_minutes(
    cost_model: dict[str, Any], partitions: Iterable[str], unit: str, granted_micro: int,
) -> dict[str, int]:
    """GrpTRESMins for a grant of ``granted_micro`` micro-units of ``unit``.

    Per TRES: the largest weight over ``partitions`` (and ``*``), so the minutes are
    the fewest any partition would allow; floored (a limit never exceeds the grant).
    """
    weights: dict[str, float] = {}
    # the cluster's partitions and those the model names; "*" only stands for "any" when
    # no partition is known (weights_for already falls back to "*" and the defaults)
    names = (set(partitions) | set(cost_model.get("partitions", {}))) - {"*"} or {"*"}
    for part in names:
        for tres, w in weights_for(cost_model, part, unit).items():
            weights[tres] = max(weights.get(tres, 0.0), float(w))
    if not weights:
        weights = dict(DEFAULT_WEIGHTS[unit])
    granted = max(0, granted_micro) / MICRO
    return {tres: math.floor(60 * granted / w + 1e-9) for tres, w in weights.items() if w > 0}


def desired_state(session: Session, cluster: Cluster, *, on: date | None = None) -> dict[str, DesiredAccount]:
    """Managed accounts of ``cluster`` → what Slurm should hold for each."""
    day = on or today()
    rows = session.exec(
        select(Allocation, Project).join(Project, Project.id == Allocation.project_id)  # type: ignore[arg-type]
        .where(Allocation.cluster_id == cluster.id).order_by(col(Allocation.id))
    ).all()
    partitions = [str(p.get("name")) for p in cluster.partitions if p.get("name")]
    usernames = {a.user_id: a.username for a in session.exec(
        select(ClusterAccount).where(ClusterAccount.cluster_id == cluster.id)).all()}
    out: dict[str, DesiredAccount] = {}
    for alloc, project in rows:
        name = canonical_account(alloc.account)  # older rows may predate the stored lower case
        want = out.setdefault(name, DesiredAccount(account=name, active=False))
        valid = project.status == "active" and (alloc.start_date is None or alloc.start_date <= day) \
            and (alloc.end_date is None or day <= alloc.end_date) \
            and (project.end_date is None or day <= project.end_date)
        if not valid:
            continue
        want.active = True
        want.allocations.append(alloc.id or 0)
        for tres, minutes in tres_minutes(cluster.cost_model, partitions, alloc.unit, alloc.granted).items():
            want.grp_tres_mins[tres] = want.grp_tres_mins.get(tres, 0) + minutes
        members = session.exec(select(Membership.user_id).where(Membership.project_id == project.id)).all()
        want.users.update(usernames[uid] for uid in members if uid in usernames)
    return out


def plan(desired: dict[str, DesiredAccount], snapshot: AccountingSnapshot) -> list[AccountingChange]:
    """The changes that turn ``snapshot`` into ``desired`` (empty: no drift)."""
    changes: list[AccountingChange] = []
    for name in sorted(desired):
        want = desired[name]
        row = snapshot.account_row(name)
        have_users = snapshot.users_of(name)
        if not want.active:
            changes += [AccountingChange("remove_association", name, user=u, reason="allocation ended")
                        for u in sorted(have_users)]
            if row is not None:
                changes.append(AccountingChange("remove_account", name, reason="allocation ended"))
            continue
        if row is None:
            changes.append(AccountingChange("add_account", name, grp_tres_mins=want.grp_tres_mins,
                                            reason="allocation without a Slurm account"))
        elif dict(row.grp_tres_mins) != want.grp_tres_mins:
            limits: dict[str, int] = dict.fromkeys(row.grp_tres_mins, -1)
            limits.update(want.grp_tres_mins)
            changes.append(AccountingChange("set_limit", name, grp_tres_mins=limits,
                                            reason=f"Slurm has {dict(row.grp_tres_mins) or 'no limit'}"))
        changes += [AccountingChange("add_association", name, user=u, reason="project member")
                    for u in sorted(want.users - have_users)]
        changes += [AccountingChange("remove_association", name, user=u, reason="not a project member")
                    for u in sorted(have_users - want.users)]
    return changes


def accounting_manager(registry: AdapterRegistry, cluster: Cluster) -> AccountingManager:
    try:
        return adapter_for(registry, cluster).accounting()
    except AdapterConfigError as exc:
        raise InvalidRequest(str(exc), code="enforcement_unsupported") from exc


def adapter_call(cluster: Cluster, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except AdapterConfigError as exc:
        raise InvalidRequest(str(exc), code="enforcement_unsupported") from exc
    except AdapterError as exc:
        raise ClusterUnavailable(f"Accounting of cluster {cluster.name}: {exc}", retry_after=60) from exc
    except ValueError as exc:  # a name the broker refuses to hand to Slurm
        raise InvalidRequest(f"Cluster {cluster.name}: {exc}", code="validation_error") from exc


def sync_cluster(
    session: Session, *, principal: Principal | None, registry: AdapterRegistry, name: str, dry_run: bool,
) -> SyncReport:
    """Compare the cluster's accounting with the broker's allocations; apply the plan
    unless ``dry_run``. Applying needs ``enforce_budgets`` on (409 otherwise)."""
    if principal is not None:
        require_role(principal, "sysadmin")
    cluster, desired = _prepare(session, name, dry_run=dry_run)
    report = _carry_out(cluster, registry, desired, dry_run=dry_run)
    _store(session, cluster, report)
    return report


def sync_in_background(engine: Engine, *, registry: AdapterRegistry, name: str) -> SyncReport:
    """The tracker's sync: the database is read, then released while Slurm is asked and
    changed (SQLite would otherwise hold its write lock for every sacctmgr round trip),
    then the status is written in a second short transaction."""
    with session_scope(engine) as session:
        cluster, desired = _prepare(session, name, dry_run=False)
    report = _carry_out(cluster, registry, desired, dry_run=False)
    with session_scope(engine) as session:
        _store(session, get_cluster(session, name), report)
    return report


def _prepare(session: Session, name: str, *, dry_run: bool) -> tuple[Cluster, dict[str, DesiredAccount]]:
    cluster = get_cluster(session, name)
    if not dry_run and not cluster.enforce_budgets:
        raise Conflict(f"Budget enforcement is off for cluster {name}; enable it first "
                       "(aifa-broker cluster update NAME --enforce-budgets).", code="enforcement_disabled")
    desired = desired_state(session, cluster)
    for acct in desired.values():
        for n in (acct.account, *acct.users):
            adapter_call(cluster, valid_name, n)
    return cluster, desired


def _carry_out(cluster: Cluster, registry: AdapterRegistry, desired: dict[str, DesiredAccount], *,
               dry_run: bool) -> SyncReport:
    manager = accounting_manager(registry, cluster)
    snapshot: AccountingSnapshot = adapter_call(cluster, manager.snapshot, sorted(desired))
    changes = plan(desired, snapshot)
    applied = False
    if changes and not dry_run:
        adapter_call(cluster, manager.apply, changes)
        applied = True
    log.info("cluster %s: enforcement %s, %d change(s)%s", cluster.name, "dry run" if dry_run else "sync",
             len(changes), " applied" if applied else "")
    return SyncReport(cluster=cluster.name, slurm_cluster=snapshot.cluster, enabled=cluster.enforce_budgets,
                      dry_run=dry_run, applied=applied, changes=changes, accounts=list(desired.values()))


def _store(session: Session, cluster: Cluster, report: SyncReport) -> None:
    status = report.as_dict()
    # drift left after this call: none once applied
    status["drift"] = 0 if report.applied or not report.changes else len(report.changes)
    status["error"] = None
    if report.applied:
        status["applied_at"] = report.checked_at
    elif cluster.enforcement_status:
        status["applied_at"] = cluster.enforcement_status.get("applied_at")
    status.pop("accounts")
    cluster.enforcement_status = status
    session.add(cluster)


def record_failure(session: Session, *, cluster: Cluster, error: str) -> None:
    """Keep the last sync error on the cluster (shown by the drift report and metrics)."""
    status = dict(cluster.enforcement_status or {})
    status["error"] = error[:500]
    status["checked_at"] = utcnow().isoformat()
    cluster.enforcement_status = status
    session.add(cluster)
