"""Connection settings of a ``slurm_rest`` cluster (the ``connection`` table).

=========================  =====================================================
key                        meaning
=========================  =====================================================
``url``                    slurmrestd base URL, e.g. ``http://127.0.0.1:6820``
``auth``                   ``jwt_key`` (mint per-user HS256 tokens with Slurm's
                           JWT key) or ``proxy_token`` (one token of a privileged
                           proxy user, end user in ``X-SLURM-USER-NAME``)
``jwt_key_file``           Slurm's ``jwt_hs256.key`` (``auth = "jwt_key"``)
``token_lifetime_seconds`` lifetime of minted tokens (default 300)
``proxy_token_file``       file holding the proxy token (``auth = "proxy_token"``)
``query_username``         account used for queries that must see every user's
                           jobs (poll, usage, find_by_tag, health, discover).
                           With ``PrivateData=jobs`` (or ``usage``) this must be
                           an operator/admin account or ``SlurmUser``. Unset:
                           poll queries as each job's own user; usage,
                           find_by_tag, discover and a full health check need it.
``admin_username``         Slurm operator (``AdminLevel=Operator``, or SlurmUser)
                           the budget-enforcement sync writes accounts,
                           associations and limits as (v0.0.40+ only); reads of
                           accounting fall back to ``query_username``
``api_version``            optional: a version (``"v0.0.42"``) or list of
                           versions the adapter may use; the version is still
                           discovered from ``/openapi/v3``, this only restricts
                           (and so prefers) among those served
``timeout``                seconds per HTTP request (default 30)
``connect_timeout``        seconds to connect (default min(5, timeout))
``slurm_release``          informational hint (``"22.05"``), shown in health
``home_template``          working directory when the job gives none
                           (default ``/home/{username}``)
``accounting_lookback_hours``  how far back poll/find_by_tag search accounting
                           when a job's submit time is unknown (default 168)
``usage_max_response_bytes``  cap on one usage-import answer (default 16 MiB,
                           ~3,800 jobs at 4.4 KB each on 24.11); past it the read
                           fails with ``output_too_large`` and the importer asks
                           for a narrower window
``usage_clock_margin_seconds``  added to each side of a usage-import window for
                           the difference between the broker's clock and
                           slurmrestd's (default 60; every read pays 2 × this)
=========================  =====================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from adapters.slurm_common.window import DEFAULT_CLOCK_MARGIN_SECONDS
from broker.adapter import AdapterConfigError, reject_unknown_settings

AUTH_MODES = ("jwt_key", "proxy_token")


@dataclass(frozen=True)
class RestSettings:
    """Validated connection settings."""

    url: str
    auth: str
    jwt_key_file: str | None = None
    token_lifetime_seconds: int = 300
    proxy_token_file: str | None = None
    query_username: str | None = None
    admin_username: str | None = None
    api_versions: tuple[str, ...] = ()
    timeout: float = 30.0
    connect_timeout: float = 5.0
    slurm_release: str | None = None
    home_template: str = "/home/{username}"
    accounting_lookback_hours: int = 168
    usage_max_response_bytes: int = 16 * 1024 * 1024
    usage_clock_margin_seconds: float = DEFAULT_CLOCK_MARGIN_SECONDS

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RestSettings:
        """Parse and check the ``connection`` table; raise AdapterConfigError when unusable."""
        reject_unknown_settings("slurm_rest", raw, {f.name for f in fields(cls)} - {"api_versions"} | {"api_version"})
        url = _required_str(raw, "url").rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise AdapterConfigError(f"slurm_rest: url must be http(s)://host:port, got {url!r}")
        auth = _required_str(raw, "auth")
        if auth not in AUTH_MODES:
            raise AdapterConfigError(f"slurm_rest: auth must be one of {AUTH_MODES}, got {auth!r}")
        key_file = _optional_str(raw, "jwt_key_file")
        token_file = _optional_str(raw, "proxy_token_file")
        if auth == "jwt_key" and not key_file:
            raise AdapterConfigError("slurm_rest: auth = 'jwt_key' needs jwt_key_file")
        if auth == "proxy_token" and not token_file:
            raise AdapterConfigError("slurm_rest: auth = 'proxy_token' needs proxy_token_file")
        timeout = _positive_number(raw, "timeout", 30.0)
        return cls(
            url=url,
            auth=auth,
            jwt_key_file=key_file,
            token_lifetime_seconds=int(_positive_number(raw, "token_lifetime_seconds", 300)),
            proxy_token_file=token_file,
            query_username=_optional_str(raw, "query_username"),
            admin_username=_optional_str(raw, "admin_username"),
            api_versions=_versions(raw.get("api_version")),
            timeout=timeout,
            connect_timeout=_positive_number(raw, "connect_timeout", min(5.0, timeout)),
            slurm_release=_optional_str(raw, "slurm_release"),
            home_template=_optional_str(raw, "home_template") or "/home/{username}",
            accounting_lookback_hours=int(_positive_number(raw, "accounting_lookback_hours", 168)),
            usage_max_response_bytes=int(_positive_number(raw, "usage_max_response_bytes", 16 * 1024 * 1024)),
            usage_clock_margin_seconds=_positive_number(raw, "usage_clock_margin_seconds",
                                                        DEFAULT_CLOCK_MARGIN_SECONDS),
        )


def _required_str(raw: Mapping[str, Any], key: str) -> str:
    value = _optional_str(raw, key)
    if not value:
        raise AdapterConfigError(f"slurm_rest: setting {key!r} is required")
    return value


def _optional_str(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise AdapterConfigError(f"slurm_rest: setting {key!r} must be a string")
    return value


def _positive_number(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise AdapterConfigError(f"slurm_rest: setting {key!r} must be a positive number")
    return float(value)


def _versions(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise AdapterConfigError("slurm_rest: api_version must be a string or a list of strings")
    return tuple(v if v.startswith("v") else f"v{v}" for v in items)
