"""Slurm accounting through slurmrestd's ``slurmdb`` endpoints: the ``slurm_rest``
accounting manager (budget enforcement and account import).

Which versions can write (found live on the dev clusters):

- **v0.0.40 – v0.0.45** (Slurm 23.11+; 24.11 and 26.05 here): read and write.
  ``POST accounts_association`` creates an account with its association on the
  cluster, ``POST users_association`` adds users to it, ``POST associations``
  sets ``max.tres.group.minutes`` (GrpTRESMins) on an existing association,
  ``DELETE association`` removes one user's association and ``DELETE
  associations`` (account + cluster) the account's own.
- **v0.0.38 and older** (Slurm 22.05): read only. ``POST associations`` answers
  success but leaves the limits of an existing association unchanged, so a sync
  could never correct a limit: the broker refuses to write through it
  (``enforcement_unsupported``) — use the ``slurm_ssh`` adapter (sacctmgr) there.

Writes run as ``admin_username`` (a Slurm operator or SlurmUser); reads as
``admin_username`` or ``query_username``. Names are validated
(:func:`broker.accounting.valid_name`) before they reach a URL or a body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from adapters.slurm_rest.client import JsonObject, RestClient
from adapters.slurm_rest.layers import ApiLayer
from broker.accounting import (
    AccountingChange,
    AccountingManager,
    AccountingSnapshot,
    Association,
    valid_name,
)
from broker.adapter import AdapterConfigError

__all__ = ["WRITABLE_FROM", "RestAccountingManager", "tres_from_list", "tres_to_list"]

#: the first slurmrestd version whose slurmdb endpoints update association limits
WRITABLE_FROM = (0, 0, 40)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.lstrip("v").split("."))


def tres_from_list(items: Any) -> dict[str, int]:
    """``[{"type": "gres", "name": "gpu", "count": 3}]`` → ``{"gres/gpu": 3}``."""
    out: dict[str, int] = {}
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping) or not item.get("type"):
            continue
        key = str(item["type"]) + (f"/{item['name']}" if item.get("name") else "")
        try:
            out[key] = int(item.get("count"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    return out


def tres_to_list(tres: Mapping[str, int]) -> list[dict[str, Any]]:
    """``{"gres/gpu": 3}`` → ``[{"type": "gres", "name": "gpu", "count": 3}]``."""
    out = []
    for key, count in sorted(tres.items()):
        kind, _, name = key.partition("/")
        out.append({"type": kind, "name": name, "count": int(count)})
    return out


class RestAccountingManager(AccountingManager):
    """Accounting of one cluster via slurmrestd (see the module docstring)."""

    def __init__(self, *, cluster: str, client: RestClient, layer: Callable[[str], ApiLayer],
                 cluster_name: Callable[[], str | None], admin_username: str | None,
                 reader: str | None) -> None:
        self._label = cluster
        self._client = client
        self._layer = layer
        self._cluster_name = cluster_name
        self._admin = admin_username
        self._reader = admin_username or reader
        if not admin_username:
            self.writable = False
            self.why_read_only = (f"cluster {cluster}: set connection.admin_username (a Slurm operator or "
                                  "SlurmUser) to let the broker write accounts, associations and limits")

    def _user(self) -> str:
        if not self._reader:
            raise AdapterConfigError(f"cluster {self._label}: set connection.admin_username or query_username "
                                     "to read accounting", code="no_query_username")
        return self._reader

    def slurm_cluster(self) -> str:
        name = self._cluster_name()
        if not name:
            raise AdapterConfigError(f"cluster {self._label}: slurmrestd does not tell its Slurm cluster name",
                                     code="enforcement_unsupported")
        return valid_name(name)

    def snapshot(self, accounts: Sequence[str] | None = None) -> AccountingSnapshot:
        user = self._user()
        layer = self._layer(user)
        cluster = self.slurm_cluster()
        users_body = self._client.get(layer.db_path("users"), username=user, during="accounting users")
        users = frozenset(str(u["name"]) for u in layer.items(users_body, "users") if u.get("name"))
        wanted = None if accounts is None else {valid_name(a) for a in accounts}
        if wanted is not None and not wanted:
            return AccountingSnapshot(cluster, frozenset(), users, ())
        params = {"cluster": cluster}
        if wanted is not None:
            params["account"] = ",".join(sorted(wanted))
        try:
            body = self._client.get(layer.db_path("associations"), username=user, during="accounting associations",
                                    params=params)
        except Exception as exc:  # 22.05 answers "[9003] Nothing found" for an empty result
            if "Nothing found" not in str(exc):
                raise
            body = {}
        rows = []
        for item in layer.items(body, "associations"):
            account = item.get("account")
            if not isinstance(account, str) or item.get("cluster") not in (None, cluster):
                continue
            if wanted is not None and account not in wanted:
                continue
            limits = ((item.get("max") or {}).get("tres") or {}).get("group") or {}
            rows.append(Association(account=account, user=item.get("user") or None,
                                    grp_tres_mins=tres_from_list(limits.get("minutes")),
                                    parent=item.get("parent_account") or None))
        return AccountingSnapshot(cluster=cluster, accounts=frozenset(r.account for r in rows if r.user is None),
                                  users=users, associations=tuple(rows))

    def apply(self, changes: Sequence[AccountingChange]) -> None:
        if not self.writable or not self._admin:
            raise AdapterConfigError(self.why_read_only, code="enforcement_unsupported")
        layer = self._layer(self._admin)
        if _version(layer.version) < WRITABLE_FROM:
            raise AdapterConfigError(
                f"cluster {self._label}: slurmrestd {layer.version} cannot update association limits "
                "(it answers success and changes nothing); enforce through the slurm_ssh adapter (sacctmgr)",
                code="enforcement_unsupported")
        cluster = self.slurm_cluster()
        for change in changes:
            if change.action == "remove_association" and change.user:
                self._move_default(layer, valid_name(change.user), change.account, cluster)
            for method, path, params, body in self.requests_for(layer, change, cluster):
                self._client.request(method, path, username=self._admin, during=change.describe(),
                                     params=params, body=body)

    def _move_default(self, layer: ApiLayer, user: str, account: str, cluster: str) -> None:
        """Before ``user`` leaves ``account``: if it is the user's default account and
        the user keeps other associations, make one of those the default (slurmdbd
        refuses to remove a default account)."""
        assert self._admin is not None
        body = self._client.get(layer.db_path("associations"), username=self._admin, during="user associations",
                                params={"user": user, "cluster": cluster})
        rows = [r for r in layer.items(body, "associations") if r.get("user") == user]
        if not any(r.get("account") == account and r.get("is_default") for r in rows):
            return
        others = sorted({str(r["account"]) for r in rows if r.get("account") and r.get("account") != account})
        if others:
            self._client.request("POST", layer.db_path("users"), username=self._admin, during="new default account",
                                 body={"users": [{"name": user, "default": {"account": valid_name(others[0])}}]})

    @staticmethod
    def requests_for(layer: ApiLayer, change: AccountingChange,
                     cluster: str) -> list[tuple[str, str, dict[str, str] | None, JsonObject | None]]:
        """The HTTP requests (method, path, params, body) that carry out ``change``."""
        account = valid_name(change.account)
        user = valid_name(change.user) if change.user is not None else None
        limit: list[tuple[str, str, dict[str, str] | None, JsonObject | None]] = []
        if change.grp_tres_mins:
            limit = [("POST", layer.db_path("associations"), None, {"associations": [{
                "account": account, "cluster": cluster, "user": "",
                "max": {"tres": {"group": {"minutes": tres_to_list(change.grp_tres_mins)}}}}]})]
        if change.action == "add_account":
            return [("POST", layer.db_path("accounts_association"), None, {
                "association_condition": {"accounts": [account], "clusters": [cluster], "association": {}},
                "account": {"description": "aifa-broker allocation", "organization": "aifa-broker"}}), *limit]
        if change.action == "set_limit":
            return limit
        if change.action == "remove_account":
            return [("DELETE", layer.db_path("associations"), {"account": account, "cluster": cluster}, None)]
        if user is None:
            raise ValueError(f"{change.action} needs a user")
        if change.action == "add_association":
            return [("POST", layer.db_path("users_association"), None, {
                "association_condition": {"accounts": [account], "users": [user], "clusters": [cluster]},
                "user": {}})]
        if change.action == "remove_association":
            return [("DELETE", layer.db_path("association"),
                     {"account": account, "user": user, "cluster": cluster}, None)]
        raise ValueError(f"unknown change {change.action!r}")
