"""Bring a cluster's existing Slurm accounts, users and associations into the broker.

Proposal (``aifa-broker cluster import-accounts NAME``, a dry run unless applied):

- every Slurm account except Slurm's own ``root`` → a **project** whose code is the
  account name (status ``active``; ``attributes.imported_from`` records where it
  came from). No allocation is created: the amount is a quota manager's decision
  (``allocation grant PROJECT --cluster NAME --account ACCOUNT ...``);
- every user with an association under one of those accounts → a **broker user**
  of the same name and a **cluster account** mapping it to that POSIX name (a POSIX
  name already mapped to some broker user keeps that mapping);
- every such association → a **membership** (role ``member``).

Existing objects are never changed: they are reported as ``exists`` — or as
``conflict`` when the broker maps the user to another POSIX name — so a second
run reports nothing new.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, select

from broker.accounting import AccountingSnapshot
from broker.models import ClusterAccount, Membership, Project, User, pk
from broker.registry import AdapterRegistry
from broker.schemas import CODE_RE, POSIX_RE
from broker.services import enforcement
from broker.services.common import get_cluster, get_or_create_user

_CODE = re.compile(CODE_RE)
_POSIX = re.compile(POSIX_RE)


@dataclass
class ImportItem:
    """One proposed object: ``status`` new / exists / conflict / skipped."""

    kind: str
    key: str
    status: str
    detail: str = ""


@dataclass
class ImportReport:
    """What an import proposes (dry run) or did (applied)."""

    source: str
    applied: bool
    items: list[ImportItem] = field(default_factory=list)

    def add(self, kind: str, key: str, status: str, detail: str = "") -> None:
        self.items.append(ImportItem(kind, key, status, detail))

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for item in self.items:
            out.setdefault(item.kind, {}).setdefault(item.status, 0)
            out[item.kind][item.status] += 1
        return out

    def changes(self) -> int:
        return sum(1 for i in self.items if i.status not in ("exists", "skipped"))

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "applied": self.applied, "changes": self.changes(),
                "counts": self.counts(),
                "items": [{"kind": i.kind, "key": i.key, "status": i.status, "detail": i.detail}
                          for i in self.items]}


def import_accounts(session: Session, *, registry: AdapterRegistry, name: str, apply: bool) -> ImportReport:
    """Read the cluster's accounting and propose (or, with ``apply``, create) projects,
    users, cluster accounts and memberships. Idempotent."""
    cluster = get_cluster(session, name)
    manager = enforcement.accounting_manager(registry, cluster)
    snapshot: AccountingSnapshot = enforcement.adapter_call(cluster, manager.snapshot, None)
    report = ImportReport(source=f"cluster {name} (Slurm cluster {snapshot.cluster})", applied=apply)
    accounts = sorted(a for a in snapshot.accounts if a != "root")
    projects: dict[str, Project | None] = {}
    for account in accounts:
        if not _CODE.match(account):
            report.add("project", account, "skipped", "not a valid project code")
            continue
        project = session.exec(select(Project).where(Project.code == account)).first()
        if project is not None:
            report.add("project", account, "exists")
        else:
            report.add("project", account, "new", f"from Slurm account {account}")
            if apply:
                project = Project(code=account, title=f"Slurm account {account} on {name}", status="active",
                                  attributes={"imported_from": {"cluster": name, "account": account}})
                session.add(project)
                session.flush()
        projects[account] = project
    assoc = sorted({(a.account, a.user) for a in snapshot.associations if a.user and a.account in projects})
    users: dict[str, User | None] = {}
    for posix in sorted({u for _, u in assoc}):
        users[posix] = _import_user(session, report, cluster_id=pk(cluster), cluster=name, posix=posix, apply=apply)
    for account, posix in assoc:
        project, user = projects.get(account), users.get(posix)
        key = f"{posix}@{account}"
        if project is None or user is None:  # not created yet (dry run), or skipped
            report.add("membership", key, "new" if _POSIX.match(posix) else "skipped", "member")
            continue
        member = session.exec(select(Membership).where(Membership.project_id == project.id,
                                                       Membership.user_id == user.id)).first()
        if member is not None:
            report.add("membership", key, "exists", member.role)
        else:
            report.add("membership", key, "new", "member")
            session.add(Membership(project_id=pk(project), user_id=pk(user), role="member"))
    session.flush()
    return report


def _import_user(session: Session, report: ImportReport, *, cluster_id: int, cluster: str, posix: str,
                 apply: bool) -> User | None:
    """The broker user for POSIX name ``posix`` (created when applying); reports the user
    and its cluster-account mapping."""
    if not _POSIX.match(posix):
        report.add("user", posix, "skipped", "not a valid POSIX user name")
        return None
    mapped = session.exec(select(User).join(ClusterAccount, ClusterAccount.user_id == User.id)  # type: ignore[arg-type]
                          .where(ClusterAccount.cluster_id == cluster_id, ClusterAccount.username == posix)).first()
    if mapped is not None:
        report.add("user", posix, "exists", f"broker user {mapped.name}")
        report.add("cluster_account", f"{mapped.name}→{posix}", "exists")
        return mapped
    user = session.exec(select(User).where(User.name == posix)).first()
    report.add("user", posix, "exists" if user else "new")
    if user is not None:
        other = session.exec(select(ClusterAccount).where(ClusterAccount.cluster_id == cluster_id,
                                                          ClusterAccount.user_id == user.id)).first()
        if other is not None:
            report.add("cluster_account", f"{posix}→{posix}", "conflict",
                       f"{posix} runs as {other.username} on {cluster}; left unchanged")
            return user
    report.add("cluster_account", f"{posix}→{posix}", "new")
    if not apply:
        return user
    user = user or get_or_create_user(session, posix)
    session.add(ClusterAccount(user_id=pk(user), cluster_id=cluster_id, username=posix))
    session.flush()
    return user
