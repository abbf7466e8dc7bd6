"""Request and response bodies of API v1 (**contract**; unknown fields are errors)."""

from __future__ import annotations

import math
import re
from datetime import date, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from broker.account_names import canonical_account

CODE_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
#: a scheduler account: stored and answered in lower case, as Slurm stores it
#: (``broker.account_names``); ``AIFA-X`` and ``aifa-x`` are one account
SchedulerAccount = Annotated[str, Field(
    pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
    description="The scheduler account its jobs run under; stored and answered in lower case, as Slurm "
                "stores account names (AIFA-X and aifa-x are one account)."), AfterValidator(canonical_account)]
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,254}$"
POSIX_RE = r"^[a-z_][a-z0-9_.\-]{0,31}$"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
UNITS = Literal["gpu_hours", "node_hours", "core_hours", "billing_hours"]
Amount = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
#: dates the broker reasons about (validity, usage windows, forecasts): far enough
#: either way for any allocation, near enough that date arithmetic never overflows
MIN_DATE, MAX_DATE = date(2000, 1, 1), date(2199, 12, 31)
SupportedDate = Annotated[date, Field(ge=MIN_DATE, le=MAX_DATE)]
#: the largest id a path may name (ids are 32-bit on every supported database)
MAX_ID = 2**31 - 1
#: bounds of free-form JSON (project attributes, cluster connection/cost model)
MAX_JSON_DEPTH = 8
MAX_JSON_ITEMS = 1000
MAX_JSON_STRING = 8192
Threshold = Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]
Thresholds = Annotated[list[Threshold], Field(max_length=16)]
FreeJson = Annotated[dict[Annotated[str, Field(max_length=128)], Any], Field(max_length=256)]


def check_json(value: Any, where: str = "body", depth: int = 0) -> None:
    """Refuse what no field may hold: NUL in any string or key, NaN/Infinity, and
    unbounded nesting or size (the database and the arithmetic behind would fail)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where} must not contain NUL characters")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number")
    elif isinstance(value, dict | list):
        if depth >= MAX_JSON_DEPTH:
            raise ValueError(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
        if len(value) > MAX_JSON_ITEMS:
            raise ValueError(f"{where} has more than {MAX_JSON_ITEMS} entries")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            check_json(key, where, depth + 1)
            check_json(item, f"{where}.{key}", depth + 1)


def _bounded_strings(value: Any) -> None:
    if isinstance(value, str) and len(value) > MAX_JSON_STRING:
        raise ValueError(f"strings in free-form fields are limited to {MAX_JSON_STRING} characters")
    if isinstance(value, dict):
        for item in value.values():
            _bounded_strings(item)
    elif isinstance(value, list):
        for item in value:
            _bounded_strings(item)


class Strict(BaseModel):
    """A request body: unknown fields, NUL, non-finite numbers and unbounded nesting are errors."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _edge(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                check_json(key, "body")
                check_json(value, str(key), 1)
        return data


class Patch(Strict):
    """A PATCH body: an absent field stays as it is; ``null`` is accepted only where it
    means "clear" (``NULLABLE``), elsewhere it is a 422 like any other wrong type."""

    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            bad = sorted(k for k, v in data.items() if v is None and k in cls.model_fields and k not in cls.NULLABLE)
            if bad:
                raise ValueError(f"{', '.join(bad)} cannot be null (leave a field out to keep it)")
        return data


def _no_controls(value: str, what: str, allow_newlines: bool = False) -> str:
    bad = {chr(c) for c in range(32)} - ({"\n", "\t", "\r"} if allow_newlines else set())
    if "\x00" in value or any(ch in bad for ch in value) or "\x7f" in value:
        raise ValueError(f"{what} must not contain control characters")
    return value


JOB_STATE_NAMES = ("PENDING", "RUNNING", "COMPLETING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                   "SUBMIT_FAILED", "UNKNOWN", "TERMINAL")


class JobNotify(Strict):
    """A job's own webhook: POSTed (HMAC-signed with ``secret``, like the quota
    webhooks) when the job reaches one of ``on`` (``TERMINAL`` = any end state)."""

    url: Annotated[StrictStr, Field(min_length=8, max_length=2000)]
    secret: Annotated[StrictStr, Field(min_length=16, max_length=256)]
    on: Annotated[list[Annotated[StrictStr, Field(max_length=16)]], Field(min_length=1, max_length=10)] = \
        Field(default_factory=lambda: ["TERMINAL"])

    @field_validator("on")
    @classmethod
    def _states(cls, v: list[str]) -> list[str]:
        words = sorted({s.upper() for s in v})
        bad = [w for w in words if w not in JOB_STATE_NAMES]
        if bad:
            raise ValueError(f"unknown state(s) {', '.join(bad)}; use {', '.join(JOB_STATE_NAMES)}")
        return words


class JobRequest(Strict):
    """A job submission (**contract**).

    The script's ``#SBATCH`` lines are part of the request: the server parses them
    (broker.directives) and the fields set here override them, as sbatch's command
    line overrides ``#SBATCH``. ``time_limit_minutes`` may be left out when the
    script has ``#SBATCH --time``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    project: Annotated[StrictStr, Field(pattern=CODE_RE)]
    script: Annotated[StrictStr, Field(min_length=1, max_length=1_048_576)]
    time_limit_minutes: Annotated[StrictInt, Field(ge=1, le=525_600)] | None = None
    cluster: Annotated[StrictStr, Field(pattern=CODE_RE)] | None = None
    partition: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] | None = None
    name: Annotated[StrictStr, Field(min_length=1, max_length=128)] = "job"
    nodes: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1
    ntasks_per_node: Annotated[StrictInt, Field(ge=1, le=4096)] = 1
    cpus_per_task: Annotated[StrictInt, Field(ge=1, le=4096)] = 1
    gpus_per_node: Annotated[StrictInt, Field(ge=0, le=64)] = 0
    memory_per_node_mb: Annotated[StrictInt, Field(ge=1, le=64 * 1024 * 1024)] | None = None
    environment: dict[Annotated[StrictStr, Field(max_length=128)],
                      Annotated[StrictStr, Field(max_length=8192)]] = Field(default_factory=dict, max_length=256)
    working_directory: Annotated[StrictStr, Field(min_length=1, max_length=4096)] | None = None
    #: a job array, as sbatch's ``--array`` (``0-15:2%4``); overrides the script's (docs/directives.md)
    array: Annotated[StrictStr, Field(pattern=r"^[0-9][0-9,\-:%]{0,1023}$")] | None = None
    #: optional: a webhook called on chosen transitions of this job (docs/jobs.md)
    notify: JobNotify | None = None

    @field_validator("script")
    @classmethod
    def _script(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("script must not contain NUL bytes")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _no_controls(v, "name")

    @field_validator("environment")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not ENV_NAME_RE.match(key):
                raise ValueError(f"environment name {key!r} is not a valid variable name")
            if len(value) > 8192:
                raise ValueError(f"environment value of {key} is longer than 8192 characters")
            _no_controls(value, f"environment value of {key}")
        return v

    @field_validator("working_directory")
    @classmethod
    def _wd(cls, v: str | None) -> str | None:
        if v is not None:
            _no_controls(v, "working_directory")
            if not v.startswith("/"):
                raise ValueError("working_directory must be an absolute path")
        return v


class Money(BaseModel):
    unit: str
    amount: float


class DenialOut(BaseModel):
    code: str
    detail: str


class CandidateOut(BaseModel):
    """One cluster considered by placement (``cluster: auto``)."""

    cluster: str
    partition: str | None
    eligible: bool
    denials: list[DenialOut]
    estimated_cost: Money | None
    remaining: Money | None
    #: estimate ÷ remaining budget (None when nothing is left or no allocation)
    budget_share: float | None
    expected_start: datetime | None
    #: how the start was obtained: test-only / queue-depth / immediate / none
    start_method: str | None
    start_detail: str | None = None


class PlacementOut(BaseModel):
    """Why ``cluster: auto`` chose a cluster (or none): the policy and every candidate."""

    policy: str
    chosen: str | None
    reason: str
    candidates: list[CandidateOut]


class EstimateOut(BaseModel):
    allowed: bool
    denials: list[DenialOut]
    estimated_cost: Money | None
    remaining: Money | None
    #: only for ``cluster: auto``
    cluster: str | None = None
    placement: PlacementOut | None = None


class ArrayOut(BaseModel):
    """An array job (``--array``): one broker job, one task per array index."""

    #: the ``--array`` expression as submitted (``0-15:2%4``)
    spec: str
    #: how many tasks the array has
    tasks: int
    #: the ``%max`` throttle (tasks running at once), None without one
    max_running: int | None = None
    #: tasks per state (``{"PENDING": 2, "RUNNING": 2, "COMPLETED": 4}``)
    counts: dict[str, int] = Field(default_factory=dict)


class JobTaskOut(BaseModel):
    """One task of an array job (``GET /v1/jobs/{id}/tasks``)."""

    task: int
    #: the scheduler's name of the task (``123_4``)
    scheduler_job_id: str | None
    state: str
    raw_state: str | None
    exit_code: int | None
    elapsed_seconds: int | None
    #: this task's share of the job's reservation still held (0 once it ended)
    reserved: Money
    #: what this task was charged (None until it ended)
    charged: Money | None
    started_at: datetime | None
    ended_at: datetime | None
    reason: str | None


class JobTaskPage(BaseModel):
    items: list[JobTaskOut]


class JobOut(BaseModel):
    id: str
    project: str
    cluster: str
    user: str
    name: str
    partition: str | None
    state: str
    raw_state: str | None
    scheduler_job_id: str | None
    estimated_cost: Money
    reserved: Money
    charged: Money | None
    elapsed_seconds: int | None
    submitted_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    unknown_since: datetime | None
    exit_code: int | None
    reason: str | None
    request: dict[str, Any]
    #: while PENDING: the scheduler's reason (``Resources``, ``Priority``, ``AssocGrp*Limit``...)
    pending_reason: str | None = None
    #: while PENDING: the scheduler's projected start (``squeue --start``), when it has one
    expected_start: datetime | None = None
    #: ``cluster: auto``: why this cluster (see PlacementOut)
    placement: dict[str, Any] | None = None
    #: an array job: its tasks' counts by state (the tasks: ``GET /v1/jobs/{id}/tasks``)
    array: ArrayOut | None = None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class _Dates(Strict):
    @model_validator(mode="after")
    def _dates(self) -> _Dates:
        start, end = getattr(self, "start_date", None), getattr(self, "end_date", None)
        if start and end and end < start:
            raise ValueError("end_date is before start_date")
        return self


def _attributes(value: dict[str, Any]) -> dict[str, Any]:
    _bounded_strings(value)
    return value


class ProjectIn(_Dates):
    code: Annotated[str, Field(pattern=CODE_RE)]
    title: Annotated[str, Field(min_length=1, max_length=500)]
    status: Literal["pending", "active", "suspended", "closed"] = "active"
    start_date: SupportedDate | None = None
    end_date: SupportedDate | None = None
    access_mode: Annotated[str, Field(pattern=CODE_RE)] = "playground"
    attributes: FreeJson = Field(default_factory=dict)

    _attrs = field_validator("attributes")(_attributes)


class ProjectPatch(Patch, _Dates):
    NULLABLE = frozenset({"start_date", "end_date"})

    title: Annotated[str, Field(min_length=1, max_length=500)] | SkipJsonSchema[None] = None
    status: Literal["pending", "active", "suspended", "closed"] | SkipJsonSchema[None] = None
    start_date: SupportedDate | None = None
    end_date: SupportedDate | None = None
    access_mode: Annotated[str, Field(pattern=CODE_RE)] | SkipJsonSchema[None] = None
    attributes: FreeJson | SkipJsonSchema[None] = None

    _attrs = field_validator("attributes")(_attributes)


class AllocationIn(_Dates):
    cluster: Annotated[str, Field(pattern=CODE_RE)]
    unit: UNITS
    amount: Amount
    start_date: SupportedDate | None = None
    end_date: SupportedDate | None = None
    account: SchedulerAccount
    thresholds: Thresholds | None = None


class AllocationPatch(Patch, _Dates):
    NULLABLE = frozenset({"start_date", "end_date"})

    amount: Amount | SkipJsonSchema[None] = None
    start_date: SupportedDate | None = None
    end_date: SupportedDate | None = None
    account: SchedulerAccount | SkipJsonSchema[None] = None
    thresholds: Thresholds | SkipJsonSchema[None] = None
    reason: Annotated[str, Field(max_length=1000)] = ""


class AllocationOut(BaseModel):
    id: int
    cluster: str
    unit: str
    account: str
    granted: float
    charged: float
    reserved: float
    remaining: float
    start_date: date | None
    end_date: date | None
    thresholds: list[float]
    #: things the quota manager should know (e.g. the account could not be checked)
    warnings: list[str] = []


class MemberIn(Strict):
    user: Annotated[str, Field(pattern=NAME_RE)]
    role: Literal["member", "pi"] = "member"


class MemberOut(BaseModel):
    user: str
    role: str


class ProjectOut(BaseModel):
    code: str
    title: str
    status: str
    access_mode: str
    start_date: date | None
    end_date: date | None
    attributes: dict[str, Any]
    allocations: list[AllocationOut]
    members: list[MemberOut]


PartitionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
#: placement: partition class (what a request names) → this cluster's partition
PartitionClasses = Annotated[dict[PartitionName, PartitionName], Field(max_length=64)]


class ClusterIn(Strict):
    name: Annotated[str, Field(pattern=CODE_RE)]
    adapter: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    description: Annotated[str, Field(max_length=1000)] = ""
    connection: FreeJson = Field(default_factory=dict)
    cost_model: FreeJson = Field(default_factory=dict)
    default_partition: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] | None = None
    poll_interval_seconds: Annotated[float, Field(ge=0.2, le=3600)] | None = None
    enforce_budgets: bool = False
    partition_classes: PartitionClasses = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _not_auto(cls, name: str) -> str:
        if name.lower() == "auto":
            raise ValueError("'auto' is reserved: a job request's cluster 'auto' asks the broker to choose")
        return name

    @field_validator("adapter", mode="before")
    @classmethod
    def _installed_adapter(cls, name: Any) -> Any:
        """An adapter installed here; else the error lists the installed ones."""
        from broker import plugins

        installed = plugins.available(plugins.ADAPTER_GROUP)
        if isinstance(name, str) and name not in installed:
            raise ValueError(f"unknown adapter {name!r} (installed adapters: {', '.join(installed) or 'none'})")
        return name


class ClusterPatch(Patch):
    NULLABLE = frozenset({"default_partition"})

    description: Annotated[str, Field(max_length=1000)] | SkipJsonSchema[None] = None
    connection: FreeJson | SkipJsonSchema[None] = None
    cost_model: FreeJson | SkipJsonSchema[None] = None
    default_partition: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] | None = None
    poll_interval_seconds: Annotated[float, Field(ge=0.2, le=3600)] | SkipJsonSchema[None] = None
    state: Literal["online", "draining", "offline"] | SkipJsonSchema[None] = None
    enforce_budgets: bool | SkipJsonSchema[None] = None
    partition_classes: PartitionClasses | SkipJsonSchema[None] = None


class ClusterOut(BaseModel):
    name: str
    adapter: str
    description: str
    state: str
    default_partition: str | None
    poll_interval_seconds: float
    partitions: list[dict[str, Any]]
    cost_model: dict[str, Any]
    connection: dict[str, Any]
    health_ok: bool | None
    health_detail: str | None
    health_checked_at: datetime | None
    unreachable_since: datetime | None
    dev_only: bool
    enforce_budgets: bool = False
    enforcement_status: dict[str, Any] | None = None
    partition_classes: dict[str, str] = {}


class AccountIn(Strict):
    username: Annotated[str, Field(pattern=POSIX_RE)]


class AccountOut(BaseModel):
    cluster: str
    user: str
    username: str
    #: things the sysadmin should know (e.g. the user could not be checked)
    warnings: list[str] = []


class HealthOut(BaseModel):
    cluster: str
    ok: bool
    detail: str
    latency_ms: float | None
    checks: dict[str, Any]
