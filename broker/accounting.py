"""The accounting-manager plugin contract: Slurm-native budget enforcement and import.

An adapter that can read and write a cluster's accounting database (Slurm
accounts, users, associations and their ``GrpTRESMins`` limits) returns an
:class:`AccountingManager` from :meth:`broker.adapter.ClusterAdapter.accounting`.
The core computes the desired state from its database and asks the manager for
the actual one; the difference is a list of :class:`AccountingChange` — the
plan, printed by ``cluster sync --dry-run`` and applied by the sync.

Like the adapter contract, this module imports nothing from the web or database
layers. Names are validated here (:func:`valid_name`) before any manager sees
them, so no manager ever has to quote user data for a shell or a URL.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "SLURM_NAME_RE",
    "AccountingChange",
    "AccountingManager",
    "AccountingSnapshot",
    "Association",
    "ChangeAction",
    "format_tres",
    "valid_name",
]

#: Account and user names the broker will hand to Slurm: no spaces, quotes,
#: commas, ``=`` or shell metacharacters; not starting with ``-`` (never an option).
SLURM_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")

ChangeAction = Literal["add_account", "set_limit", "add_association", "remove_association", "remove_account"]


def valid_name(name: str) -> str:
    """``name`` if it is safe as a Slurm account or user name; else ValueError."""
    if not SLURM_NAME_RE.match(name or ""):
        raise ValueError(f"not a valid Slurm account/user name: {name!r}")
    return name


def format_tres(tres: Mapping[str, int]) -> str:
    """``{"gres/gpu": 60}`` → ``gres/gpu=60`` (sorted; ``-1`` clears a limit in sacctmgr)."""
    return ",".join(f"{k}={int(v)}" for k, v in sorted(tres.items()))


@dataclass(frozen=True)
class Association:
    """One association: an account row (``user`` None) or a user row under an account."""

    account: str
    user: str | None = None
    grp_tres_mins: Mapping[str, int] = field(default_factory=dict)
    parent: str | None = None


@dataclass(frozen=True)
class AccountingSnapshot:
    """What the cluster's accounting holds (for the accounts asked, or all).

    ``cluster`` is Slurm's own ``ClusterName``; ``users`` every user known to
    accounting (with or without associations under the accounts asked).
    """

    cluster: str
    accounts: frozenset[str]
    users: frozenset[str]
    associations: tuple[Association, ...]

    def account_row(self, account: str) -> Association | None:
        """The account-level association of ``account``, if any."""
        return next((a for a in self.associations if a.account == account and a.user is None), None)

    def users_of(self, account: str) -> set[str]:
        """Users with an association under ``account``."""
        return {a.user for a in self.associations if a.account == account and a.user}


@dataclass(frozen=True)
class AccountingChange:
    """One step of a plan. ``grp_tres_mins`` for ``add_account``/``set_limit``
    (a value of ``-1`` clears that TRES's limit)."""

    action: ChangeAction
    account: str
    user: str | None = None
    grp_tres_mins: Mapping[str, int] = field(default_factory=dict)
    reason: str = ""

    def describe(self) -> str:
        """One human line, sacctmgr-like."""
        what = {
            "add_account": f"add account {self.account}",
            "set_limit": f"set GrpTRESMins of account {self.account}",
            "add_association": f"add user {self.user} to account {self.account}",
            "remove_association": f"remove user {self.user} from account {self.account}",
            "remove_account": f"remove account {self.account}",
        }[self.action]
        if self.grp_tres_mins:
            what += f" (GrpTRESMins={format_tres(self.grp_tres_mins)})"
        return what + (f" — {self.reason}" if self.reason else "")


class AccountingManager(abc.ABC):
    """Reads and writes one cluster's accounting (accounts, users, associations).

    ``writable`` is False for managers that can only read (``why_read_only`` says
    why, e.g. a slurmrestd version whose slurmdb endpoints cannot write
    associations); :meth:`apply` then raises ``AdapterConfigError``.
    """

    writable: bool = True
    why_read_only: str = ""

    @abc.abstractmethod
    def snapshot(self, accounts: Sequence[str] | None = None) -> AccountingSnapshot:
        """Accounts, users and associations (of ``accounts`` only, when given)."""

    @abc.abstractmethod
    def apply(self, changes: Sequence[AccountingChange]) -> None:
        """Carry out ``changes`` in order; raises AdapterError at the first failure."""
