"""Broker settings: a config file (TOML or YAML) plus ``AIFA_BROKER_*`` environment.

Read them through :func:`get_settings` only. With no configuration at all the
broker runs in *embedded* mode: SQLite and keys in the data directory, the
``local`` cluster, and its own token issuer.

Precedence (highest first): environment variables, the config file named by
``AIFA_BROKER_CONFIG``, defaults. Nested values use ``__`` in the environment
(``AIFA_BROKER_OIDC__AUDIENCE=aifa``).
"""

from __future__ import annotations

import functools
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

#: threads outside the request workers that use the database: /readyz and /metrics run
#: on their own small thread limiter (so they answer under load) ...
PROBE_THREADS = 2
#: ... the short reads of long polls and event streams run on the event loop's default
#: executor, bounded to this many threads (broker/api/middleware.py, Admission) ...
STREAM_THREADS = 2
#: ... and the service's background threads (tracker, usage import, notifier, event
#: hub, one spare)
BACKGROUND_DB_THREADS = 5

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "placeholder", "xxx", "todo"}

#: access modes accepted when the configuration names none (no limits attached)
DEFAULT_ACCESS_MODES = ("playground", "fast-lane", "large-scale")

DEFAULT_ELIGIBILITY_CHAIN = [
    "project_active",
    "allocation_valid",
    "cluster_account",
    "partition_allowed",
    "job_limits",
    "concurrency_limits",
]


class OIDCIssuer(BaseModel):
    """An OpenID Connect issuer whose access tokens the broker accepts."""

    issuer: str
    audience: str
    #: discovery document; default ``<issuer>/.well-known/openid-configuration``
    discovery_url: str | None = None
    #: claim holding global roles (list or space-separated string)
    roles_claim: str = "roles"
    #: map an entitlement/claim value to a broker role (AARC-style entitlements)
    role_map: dict[str, str] = Field(default_factory=dict)
    #: claim giving the broker user name
    username_claim: str = "sub"
    algorithms: list[Literal["RS256", "ES256"]] = Field(
        default_factory=lambda: ["RS256", "ES256"])  # type: ignore[arg-type]


class AccessModeLimitsConfig(BaseModel):
    allowed_partitions: list[str] | None = None
    max_nodes: int | None = None
    max_gpus_per_job: int | None = None
    max_time_minutes: int | None = None
    max_concurrent_jobs_per_user: int | None = None
    max_concurrent_jobs_per_project: int | None = None


class DashboardOIDC(BaseModel):
    """OIDC client for the browser login (authorization code + PKCE)."""

    server_metadata_url: str
    client_id: str
    client_secret: str = ""
    scope: str = "openid profile email roles"
    roles_claim: str = "roles"
    #: map an entitlement/claim value to a broker role (AARC-style entitlements)
    role_map: dict[str, str] = Field(default_factory=dict)
    #: claim giving the broker user name (as in bearer tokens of the same IdP)
    username_claim: str = "sub"


class WebhookEndpoint(BaseModel):
    """A URL receiving notifications as HMAC-signed JSON webhooks (see broker/services/notifications.py)."""

    #: short name shown in the dashboard and the API (never the secret)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str = Field(pattern=r"^https?://", max_length=2000)
    secret: str = Field(min_length=16)
    kinds: list[Literal["threshold", "expiry"]] = ["threshold", "expiry"]  # pydantic copies defaults


class Settings(BaseSettings):
    """All broker settings. See ``docs/configuration.md``."""

    model_config = SettingsConfigDict(
        env_prefix="AIFA_BROKER_", env_nested_delimiter="__", extra="forbid"
    )

    mode: Literal["embedded", "production"] = "embedded"
    data_dir: Path = Path("~/.local/share/aifa-broker")
    config: Path | None = None
    database_url: str | None = None
    #: apply pending schema migrations when a process starts (false when a separate
    #: migration job runs them, e.g. on Kubernetes)
    migrate_on_start: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    #: how users reach the broker; in production it must be https (so the dashboard's
    #: session cookie is Secure) unless ``allow_insecure_public_url`` says otherwise
    public_url: str | None = None
    #: production behind something that is not https end to end (an explicit, logged choice)
    allow_insecure_public_url: bool = False

    #: embedded issuer (mode=embedded); in production tokens come from OIDC issuers
    token_issuer: str = "aifa-broker-embedded"  # noqa: S105 - an issuer name, not a secret
    token_audience: str = "aifa-broker"  # noqa: S105 - an audience name
    token_lifetime_seconds: int = 7 * 24 * 3600
    #: the embedded issuer's signing key (ES256 JWK); unset = ``jwt_signing_key.json`` in
    #: data_dir, made on first use. Replicas share one file (e.g. a mounted Secret)
    token_signing_key_file: Path | None = None
    #: further keys whose tokens are still accepted (rotation: see docs/operations.md)
    token_verification_key_files: list[Path] = Field(default_factory=list)
    oidc_issuers: list[OIDCIssuer] = Field(default_factory=list)
    dashboard_oidc: DashboardOIDC | None = None
    session_secret: str | None = None
    dashboard_session_hours: float = 8.0

    #: notifications: webhook endpoints, expiry warnings (days before an allocation's
    #: end), how often the notifier scans/delivers, retry policy
    webhooks: list[WebhookEndpoint] = Field(default_factory=list)
    expiry_warning_days: list[int] = Field(default_factory=lambda: [30, 7])
    notification_interval_seconds: float = 15.0
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_seconds: float = 10.0
    webhook_backoff_max_seconds: float = 3600.0

    #: allow the ``local`` adapter (runs jobs as the broker's own user) in production
    allow_local_adapter_in_production: bool = False
    register_local_cluster: bool = True

    eligibility_chain: list[str] = Field(default_factory=lambda: list(DEFAULT_ELIGIBILITY_CHAIN))
    #: placement (``cluster: auto``, docs/placement.md): how the cluster is chosen among
    #: the eligible ones — ``earliest_start`` (then the lowest share of the remaining
    #: budget) or ``lowest_share`` (then the earliest start)
    placement_policy: Literal["earliest_start", "lowest_share"] = "earliest_start"
    #: how long placement waits for one cluster's expected start (``sbatch
    #: --test-only``...); a cluster that does not answer in time ranks as "start unknown"
    placement_probe_seconds: float = Field(default=10.0, gt=0, le=120)
    #: two expected starts closer than this count as equal (the budget share decides)
    placement_start_tolerance_seconds: float = Field(default=60.0, ge=0, le=86_400)
    access_modes: dict[str, AccessModeLimitsConfig] = Field(default_factory=dict)

    max_body_bytes: int = 1_048_576
    max_script_bytes: int = 512 * 1024
    max_time_limit_minutes: int = 60 * 24 * 14
    idempotency_ttl_hours: int = 48
    #: how long an in-progress Idempotency-Key claim is held before a retry may take
    #: it over (its holder is presumed dead); the job row is linked to the key before
    #: the scheduler call, so a takeover answers that job and never submits twice
    idempotency_lease_seconds: float = Field(default=30.0, gt=0, le=3600)
    rate_limit_per_minute: int = 0
    #: shared store for the rate limit (``redis://host:6379/0``) so that it holds across
    #: replicas; unset = in-process (one process)
    rate_limit_storage_url: str | None = None
    run_tracker: bool = True
    tracker_interval_seconds: float = 1.0
    local_cluster_poll_seconds: float = 1.0
    slurm_poll_seconds: float = 10.0
    reconcile_interval_seconds: float = 60.0
    #: an ACCEPTED job without scheduler id older than this is looked up by tag
    reconcile_grace_seconds: float = 30.0
    #: ... and declared never submitted when still absent after this long
    reconcile_absent_seconds: float = 120.0
    #: an array task cancelled before it started leaves no record in Slurm: the tracker
    #: ends it (charging nothing) once it has not been reported this long after the cancel
    array_cancel_grace_seconds: float = 60.0
    usage_lookback_hours: float = 48.0
    usage_import_interval_seconds: float = 300.0
    #: Slurm-native enforcement: the tracker syncs each enforcing cluster this often
    enforcement_interval_seconds: float = 300.0
    #: records imported per cycle and scheduler at most (the rest: next cycle)
    usage_import_batch: int = Field(default=2000, ge=1)
    #: each import re-reads this far before the last imported end (late accounting records)
    usage_import_overlap_minutes: float = Field(default=30.0, ge=0)
    #: one accounting read covers at most this much end time: a longer window (first
    #: import, after an outage) is read in slices, oldest first (docs/usage-import.md)
    usage_import_max_span_hours: float = Field(default=6.0, gt=0)
    log_level: str = "INFO"

    #: waiting on the server (docs/jobs.md): held long polls + event streams per user
    #: and replica (beyond: 429 too_many_streams), the longest long poll, how often
    #: new job events are looked for on SQLite (PostgreSQL: LISTEN/NOTIFY, and this
    #: × 20 as a safety net), and the keep-alive comment interval of event streams
    max_streams_per_user: int = Field(default=8, ge=1, le=10_000)
    long_poll_max_seconds: float = Field(default=300.0, gt=0, le=3600)
    event_poll_seconds: float = Field(default=0.25, gt=0, le=60)
    event_keepalive_seconds: float = Field(default=15.0, gt=0, le=3600)
    #: per-job notifications (``notify`` at submission, docs/jobs.md): the hosts a job's
    #: webhook may call ("hooks.example.org", "*.example.org", "*" = any public host;
    #: empty = the feature is off), whether loopback/private/link-local addresses are
    #: allowed (never by default), how often the sender looks for work. Retries and
    #: timeouts follow the ``webhook_*`` settings above.
    job_webhook_hosts: list[str] = Field(default_factory=list)
    job_webhook_allow_private_networks: bool = False
    job_webhook_interval_seconds: float = Field(default=1.0, gt=0, le=3600)

    #: requests of this process that run at once (worker threads); every other limit
    #: below derives from it — see docs/configuration.md "Concurrency and overload"
    worker_threads: int = Field(default=16, ge=1, le=1024)
    #: requests admitted at once (running + waiting for a thread). Default: 4 ×
    #: worker_threads (a short queue: a request's work is CPU-bound, more in flight
    #: would only lengthen each one's wait)
    max_requests_in_flight: int | None = Field(default=None, ge=1)
    #: beyond max_requests_in_flight a request waits for a slot (first come, first
    #: served) at most admission_wait_seconds, and at most max_requests_waiting wait at
    #: once; past either bound it is answered 503 ``overloaded`` + Retry-After. A burst
    #: of readers (hundreds of clients polling) is then served a few hundred ms later
    #: instead of refused, while a sustained overload is still refused within 2 s: never
    #: a long wait, and a waiting request holds no thread, no connection, only its
    #: socket (broker/api/middleware.py, docs/configuration.md "Concurrency and
    #: overload"). The default wait is the 503's Retry-After (2 s): a refused client
    #: waits that long before it retries, so waiting up to it in the queue never serves
    #: a client later than refusing it would (B5, bench/RESULTS.md: 1 s still refused
    #: ~0.2 % of a 500-reader burst on a loaded host, 2 s none). 0 for either: refused
    #: at once, as before. Default queue: 16 × worker_threads (256: what one of two
    #: processes sees of 500 clients, with room)
    admission_wait_seconds: float = Field(default=2.0, ge=0, le=10)
    max_requests_waiting: int | None = Field(default=None, ge=0)
    #: database connections of this process. Default (and minimum): every thread that may
    #: hold one at once — worker_threads + probe threads + background threads
    database_pool_size: int | None = Field(default=None, ge=1)
    #: how long a request waits for a pooled connection before a 503 (never a long wait)
    database_pool_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_values = _read_config_file(os.environ.get("AIFA_BROKER_CONFIG"))
        return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if self.mode == "production":
            if not self.oidc_issuers:
                raise ValueError("production mode needs at least one entry in oidc_issuers")
            if self.database_url is None or self.database_url.startswith("sqlite"):
                raise ValueError("production mode needs a PostgreSQL database_url")
            if self.dashboard_oidc and (self.session_secret or "").lower() in PLACEHOLDER_SECRETS:
                raise ValueError("production mode refuses a missing or placeholder session_secret")
            if self.dashboard_oidc and self.dashboard_oidc.client_secret.lower() in PLACEHOLDER_SECRETS:
                raise ValueError("production mode refuses a placeholder dashboard client_secret")
            if any(w.secret.lower() in PLACEHOLDER_SECRETS for w in self.webhooks):
                raise ValueError("production mode refuses a placeholder webhook secret")
            if not (self.public_url or "").startswith("https://") and not self.allow_insecure_public_url:
                raise ValueError("production mode needs an https public_url (session cookies are Secure only "
                                 "then); set allow_insecure_public_url = true to run without one")
        if self.database_pool_size is not None and self.database_pool_size < self.database_users:
            raise ValueError(
                f"database_pool_size={self.database_pool_size} is smaller than the {self.database_users} "
                f"threads that may hold a database connection at once (worker_threads={self.worker_threads} "
                f"+ {PROBE_THREADS + STREAM_THREADS} probe/stream + {BACKGROUND_DB_THREADS} background): "
                "requests could wait for "
                "connections while holding every worker thread, which can deadlock the broker; raise "
                f"database_pool_size to at least {self.database_users} or lower worker_threads")
        return self

    @property
    def known_access_modes(self) -> list[str]:
        """The access modes a project may have: the configured ones, or, when none
        are configured, the EuroHPC AI Factory modes (without limits)."""
        return sorted(self.access_modes) or list(DEFAULT_ACCESS_MODES)

    @property
    def database_users(self) -> int:
        """Threads that may hold a database connection at once in this process."""
        return self.worker_threads + PROBE_THREADS + STREAM_THREADS + BACKGROUND_DB_THREADS

    @property
    def pool_size(self) -> int:
        """The database pool size in force (never below :attr:`database_users`)."""
        return self.database_pool_size or self.database_users

    @property
    def requests_in_flight_limit(self) -> int:
        """Requests admitted at once (more wait, bounded, or get ``503 overloaded``)."""
        return self.max_requests_in_flight or 4 * self.worker_threads

    @property
    def requests_waiting_limit(self) -> int:
        """Requests that may wait for admission at once (beyond: ``503 overloaded``)."""
        return 16 * self.worker_threads if self.max_requests_waiting is None else self.max_requests_waiting

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'broker.sqlite3'}"


def _read_config_file(path: str | None) -> dict[str, Any]:
    """Values from a TOML or YAML config file; empty when no file is named."""
    if not path:
        return {}
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    text = p.read_text()
    data: Any = yaml.safe_load(text) if p.suffix in {".yaml", ".yml"} else tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a table/mapping at top level")
    return data


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return settings
