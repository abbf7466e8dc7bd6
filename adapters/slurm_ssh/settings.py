"""The ``connection`` table of a ``slurm_ssh`` cluster definition.

=============================== ========= ===================================================
key                             default   meaning
=============================== ========= ===================================================
host                            required  login node address
port                            22        sshd port
host_key                        required  pinned host key(s), ``"ssh-ed25519 AAAA..."`` (a str or
                                          a list); never learned, never auto-accepted
auth                            certificate ``certificate``: the broker is an SSH CA and logs in as
                                          each job's own POSIX user with a short-lived
                                          certificate; ``key``: one service account for all
ssh_ca_key_file                 (cert)    OpenSSH private key of the broker's user CA
certificate_validity_seconds    300       lifetime of each issued certificate
certificate_backdate_seconds    60        valid-after is backdated this much (clock skew)
service_username, key_file      (key)     account and private key used with ``auth = "key"``
connect_timeout                 10        TCP connect + SSH handshake + auth, seconds
command_timeout                 30        one remote command, seconds
max_output_bytes                16 MiB    cap on stdout+stderr of one command
pool_idle_seconds               60        idle pooled connections are closed after this
keepalive_seconds               15        SSH keepalive on pooled connections
max_channels_per_connection     8         concurrent commands per connection (< sshd MaxSessions)
query_username                  (none)    account for cluster-wide reads (squeue, sacct -a,
                                          sinfo, health); default: the first ref's user
admin_username                  (none)    Slurm operator (AdminLevel=Operator) the budget-enforcement
                                          sync and account import run ``sacctmgr`` as
slurm_release                   (none)    hint (``"22.05"``) used only if ``sinfo --version`` fails
accounting_lag_seconds          0         extra wait after a job's end before settling it
output_dir                      .aifa-broker/output   job stdout/stderr files (home-relative
                                          unless absolute)
find_by_tag_days                7         look-back of ``find_by_tag`` without ``since``
usage_clock_margin_seconds      60        added to each side of a usage-import window for the
                                          login node's clock (every read pays 2 × this)
=============================== ========= ===================================================

Security trade-off of ``auth = "key"``: every command (submit, cancel, read
output) runs as ``service_username``, so jobs run under that one account, the
per-user isolation of POSIX permissions is lost and the broker's key is a
standing credential for it. Use it only where per-user certificates are
impossible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from adapters.slurm_common.window import DEFAULT_CLOCK_MARGIN_SECONDS
from broker.adapter import AdapterConfigError, reject_unknown_settings

__all__ = ["SSHSettings"]

_MIB = 1024 * 1024


def _need(settings: Mapping[str, Any], key: str) -> str:
    value = settings.get(key)
    if not isinstance(value, str) or not value.strip():
        raise AdapterConfigError(f"slurm_ssh: connection.{key} is required")
    return value.strip()


def _number(settings: Mapping[str, Any], key: str, default: float, minimum: float = 0) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise AdapterConfigError(f"slurm_ssh: connection.{key} must be a number >= {minimum}")
    return float(value)


def _host_keys(value: Any) -> tuple[str, ...]:
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list | tuple) or not keys:
        raise AdapterConfigError("slurm_ssh: connection.host_key is required (pinned key)")
    result = []
    for key in keys:
        parts = key.split() if isinstance(key, str) else []
        if len(parts) < 2:
            raise AdapterConfigError("slurm_ssh: connection.host_key must read 'TYPE BASE64'")
        result.append(f"{parts[0]} {parts[1]}")
    return tuple(result)


def _optional(settings: Mapping[str, Any], key: str) -> str | None:
    value = settings.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise AdapterConfigError(f"slurm_ssh: connection.{key} must be a string")
    return value.strip()


@dataclass(frozen=True)
class SSHSettings:
    """Validated connection settings (see the module docstring)."""

    host: str
    port: int
    host_keys: tuple[str, ...]
    auth: str
    ssh_ca_key_file: str | None
    certificate_validity_seconds: int
    certificate_backdate_seconds: int
    service_username: str | None
    key_file: str | None
    connect_timeout: float
    command_timeout: float
    max_output_bytes: int
    pool_idle_seconds: float
    keepalive_seconds: int
    max_channels_per_connection: int
    query_username: str | None
    admin_username: str | None
    slurm_release: str | None
    accounting_lag_seconds: float
    output_dir: str
    find_by_tag_days: float
    usage_clock_margin_seconds: float = DEFAULT_CLOCK_MARGIN_SECONDS

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> SSHSettings:
        """Validate a ``connection`` table; raises AdapterConfigError."""
        known = {f.name for f in fields(cls)} - {"host_keys"} | {"host_key"}
        reject_unknown_settings("slurm_ssh", settings, known)
        auth = str(settings.get("auth", "certificate"))
        if auth not in {"certificate", "key"}:
            raise AdapterConfigError("slurm_ssh: connection.auth must be 'certificate' or 'key'")
        made = cls(
            host=_need(settings, "host"),
            port=int(_number(settings, "port", 22, 1)),
            host_keys=_host_keys(settings.get("host_key")),
            auth=auth,
            ssh_ca_key_file=_need(settings, "ssh_ca_key_file") if auth == "certificate" else None,
            certificate_validity_seconds=int(
                _number(settings, "certificate_validity_seconds", 300, 30)
            ),
            certificate_backdate_seconds=int(_number(settings, "certificate_backdate_seconds", 60)),
            service_username=_need(settings, "service_username") if auth == "key" else None,
            key_file=_need(settings, "key_file") if auth == "key" else None,
            connect_timeout=_number(settings, "connect_timeout", 10, 0.1),
            command_timeout=_number(settings, "command_timeout", 30, 0.1),
            max_output_bytes=int(_number(settings, "max_output_bytes", 16 * _MIB, 1024)),
            pool_idle_seconds=_number(settings, "pool_idle_seconds", 60),
            keepalive_seconds=int(_number(settings, "keepalive_seconds", 15)),
            max_channels_per_connection=int(_number(settings, "max_channels_per_connection", 8, 1)),
            query_username=_optional(settings, "query_username"),
            admin_username=_optional(settings, "admin_username"),
            slurm_release=_optional(settings, "slurm_release"),
            accounting_lag_seconds=_number(settings, "accounting_lag_seconds", 0),
            output_dir=_optional(settings, "output_dir") or ".aifa-broker/output",
            find_by_tag_days=_number(settings, "find_by_tag_days", 7, 0.001),
            usage_clock_margin_seconds=_number(settings, "usage_clock_margin_seconds",
                                               DEFAULT_CLOCK_MARGIN_SECONDS, 1),
        )
        if "\n" in made.output_dir or "\x00" in made.output_dir:
            raise AdapterConfigError("slurm_ssh: connection.output_dir is invalid")
        return made

    @property
    def host_key_entry(self) -> str:
        """The known_hosts name: ``host`` on port 22, ``[host]:port`` otherwise."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def login_for(self, username: str) -> str:
        """The SSH login used to act for ``username``."""
        if self.auth == "key" and self.service_username:
            return self.service_username
        return username
