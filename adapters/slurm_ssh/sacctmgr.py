"""Slurm accounting through ``sacctmgr`` over SSH: the ``slurm_ssh`` accounting manager.

Reads run as ``admin_username`` (else ``query_username``), writes only as
``admin_username``, a Slurm operator (``AdminLevel=Operator`` may add, modify and
remove accounts, users and limits). Every command is an argv list rendered with
:func:`adapters.slurm_ssh.commands.render` (each word ``shlex``-quoted); every
account and user name is checked against :data:`broker.accounting.SLURM_NAME_RE`
first, so no name can become an option, a second ``where`` clause or shell syntax.

Commands (``-i`` = no confirmation prompt; ``-n -P`` = parsable, no header)::

    scontrol show config                                   (ClusterName, once)
    sacctmgr -nP show assoc where cluster=C [account=A,B] format=account,user,grptresmins,parentname
    sacctmgr -nP show user format=user
    sacctmgr -i add account A cluster=C description=... organization=aifa-broker
    sacctmgr -i modify account where name=A cluster=C set GrpTRESMins=gres/gpu=60
    sacctmgr -i add user U account=A cluster=C
    sacctmgr -i remove user where name=U account=A cluster=C
    sacctmgr -i remove account where name=A cluster=C

``sacctmgr -i add`` exits 1 with "Nothing new added" when the object exists and
``remove`` says "Nothing deleted" when it is gone: both count as done, so a
replayed plan is harmless.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence

from adapters.slurm_ssh import commands
from adapters.slurm_ssh.transport import CommandResult
from broker.accounting import (
    AccountingChange,
    AccountingManager,
    AccountingSnapshot,
    Association,
    format_tres,
    valid_name,
)
from broker.adapter import AdapterConfigError, AdapterError

__all__ = ["SacctmgrManager", "parse_assoc_lines", "parse_tres"]

Runner = Callable[[str, str], CommandResult]
_CLUSTER_RE = re.compile(r"^\s*ClusterName\s*=\s*(\S+)\s*$", re.MULTILINE)
_ALREADY = ("nothing new added", "already exists", "nothing deleted", "nothing to delete")
_TRES_NAME_RE = re.compile(r"^[a-z]+(/[A-Za-z0-9_:\-]+)?$")


def parse_tres(text: str) -> dict[str, int]:
    """``gres/gpu=60,cpu=10`` → ``{"gres/gpu": 60, "cpu": 10}``."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name] = int(float(value))
        except ValueError:
            continue
    return out


def parse_assoc_lines(text: str) -> list[Association]:
    """Rows of ``account|user|grptresmins|parentname`` → associations."""
    rows = []
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 4 or not fields[0]:
            continue
        account, user, limits, parent = fields[:4]
        rows.append(Association(account=account, user=user or None, grp_tres_mins=parse_tres(limits),
                                parent=parent or None))
    return rows


class SacctmgrManager(AccountingManager):
    """Accounting of one cluster via ``sacctmgr`` (see the module docstring)."""

    def __init__(self, *, cluster: str, run: Runner, admin_username: str | None, reader: str | None,
                 slurm_cluster: str | None = None) -> None:
        self._cluster_label = cluster
        self._run = run
        self._admin = admin_username
        self._reader = admin_username or reader
        self._slurm_cluster = slurm_cluster
        self._lock = threading.Lock()
        if not admin_username:
            self.writable = False
            self.why_read_only = (f"cluster {cluster}: set connection.admin_username (a Slurm operator) "
                                  "to let the broker write accounts, associations and limits")

    # ------------------------------------------------------------------ reads

    def _read(self, argv: Sequence[str], what: str) -> str:
        if not self._reader:
            raise AdapterConfigError(f"cluster {self._cluster_label}: set connection.admin_username or "
                                     "query_username to read accounting", code="no_query_username")
        result = self._run(self._reader, commands.render(argv))
        if not result.ok:
            raise AdapterError(f"{what} failed (exit {result.exit_status}): {result.stderr.strip()[:300]}",
                               transient=True, code="accounting_failed")
        return result.stdout

    def slurm_cluster(self) -> str:
        """Slurm's ``ClusterName`` (from ``scontrol show config``, read once)."""
        with self._lock:
            if self._slurm_cluster:
                return self._slurm_cluster
        match = _CLUSTER_RE.search(self._read(["scontrol", "show", "config"], "scontrol show config"))
        if not match:
            raise AdapterError("scontrol show config has no ClusterName", code="accounting_failed")
        name = valid_name(match.group(1))
        with self._lock:
            self._slurm_cluster = name
        return name

    def snapshot(self, accounts: Sequence[str] | None = None) -> AccountingSnapshot:
        cluster = self.slurm_cluster()
        argv = ["sacctmgr", "-nP", "show", "assoc", "where", f"cluster={cluster}"]
        if accounts is not None:
            names = sorted({valid_name(a) for a in accounts})
            if not names:
                users = self._users()
                return AccountingSnapshot(cluster, frozenset(), frozenset(users), ())
            argv.append("account=" + ",".join(names))
        argv.append("format=account,user,grptresmins,parentname")
        rows = parse_assoc_lines(self._read(argv, "sacctmgr show assoc"))
        if accounts is not None:  # sacctmgr matches names case-insensitively
            wanted = set(accounts)
            rows = [r for r in rows if r.account in wanted]
        return AccountingSnapshot(
            cluster=cluster,
            accounts=frozenset(r.account for r in rows if r.user is None),
            users=frozenset(self._users()),
            associations=tuple(rows),
        )

    def _users(self) -> list[str]:
        text = self._read(["sacctmgr", "-nP", "show", "user", "format=user"], "sacctmgr show user")
        return [line.strip() for line in text.splitlines() if line.strip()]

    # ----------------------------------------------------------------- writes

    def apply(self, changes: Sequence[AccountingChange]) -> None:
        if not self.writable or not self._admin:
            raise AdapterConfigError(self.why_read_only, code="enforcement_unsupported")
        cluster = self.slurm_cluster()
        for change in changes:
            if change.action == "remove_association" and change.user:
                self._move_default(change.user, change.account, cluster)
            for argv in self.argv_for(change, cluster):
                self._write(argv, change.describe())

    def _move_default(self, user: str, account: str, cluster: str) -> None:
        """Before ``user`` leaves ``account``: if it is the user's default account and
        the user keeps other associations, make one of those the default (24.11+
        refuses to remove a default account; 22.05 leaves the user without one)."""
        assert self._admin is not None
        user = valid_name(user)
        default = self._run(self._admin, commands.render(
            ["sacctmgr", "-nP", "show", "user", "where", f"name={user}", "format=defaultaccount"])).stdout.strip()
        if default != account:
            return
        rows = self._run(self._admin, commands.render(
            ["sacctmgr", "-nP", "show", "assoc", "where", f"user={user}", f"cluster={cluster}",
             "format=account"])).stdout.split()
        others = sorted({r for r in rows if r and r != account})
        if others:
            argv = ["sacctmgr", "-i", "modify", "user", "where", f"name={user}", f"cluster={cluster}",
                    "set", f"defaultaccount={valid_name(others[0])}"]
            self._write(argv, f"make {others[0]} the default account of {user}")

    @staticmethod
    def argv_for(change: AccountingChange, cluster: str) -> list[list[str]]:
        """The sacctmgr argv lists that carry out ``change`` (names validated)."""
        account = valid_name(change.account)
        user = valid_name(change.user) if change.user is not None else None
        for name in change.grp_tres_mins:
            if not _TRES_NAME_RE.match(name):
                raise ValueError(f"not a TRES name: {name!r}")
        where_acct = ["where", f"name={account}", f"cluster={cluster}"]
        limit = [f"GrpTRESMins={format_tres(change.grp_tres_mins)}"] if change.grp_tres_mins else []
        if change.action == "add_account":
            steps = [["sacctmgr", "-i", "add", "account", account, f"cluster={cluster}",
                      "description=aifa-broker allocation", "organization=aifa-broker"]]
            if limit:
                steps.append(["sacctmgr", "-i", "modify", "account", *where_acct, "set", *limit])
            return steps
        if change.action == "set_limit":
            return [["sacctmgr", "-i", "modify", "account", *where_acct, "set", *limit]] if limit else []
        if user is None:
            if change.action == "remove_account":
                return [["sacctmgr", "-i", "remove", "account", *where_acct]]
            raise ValueError(f"{change.action} needs a user")
        if change.action == "add_association":
            return [["sacctmgr", "-i", "add", "user", user, f"account={account}", f"cluster={cluster}"]]
        if change.action == "remove_association":
            return [["sacctmgr", "-i", "remove", "user", "where", f"name={user}", f"account={account}",
                     f"cluster={cluster}"]]
        raise ValueError(f"unknown change {change.action!r}")

    def _write(self, argv: Sequence[str], what: str) -> None:
        assert self._admin is not None
        result = self._run(self._admin, commands.render(argv))
        said = (result.stdout + "\n" + result.stderr).lower()
        if result.ok or any(word in said for word in _ALREADY):
            return
        raise AdapterError(f"{what}: sacctmgr exit {result.exit_status}: "
                           f"{(result.stderr or result.stdout).strip()[:300]}", code="accounting_failed")

