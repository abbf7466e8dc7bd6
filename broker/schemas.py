"""Request and response bodies of API v1 (**contract**; unknown fields are errors)."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

CODE_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,254}$"
POSIX_RE = r"^[a-z_][a-z0-9_.\-]{0,31}$"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
UNITS = Literal["gpu_hours", "node_hours", "core_hours", "billing_hours"]
Amount = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _no_controls(value: str, what: str, allow_newlines: bool = False) -> str:
    bad = {chr(c) for c in range(32)} - ({"\n", "\t", "\r"} if allow_newlines else set())
    if "\x00" in value or any(ch in bad for ch in value) or "\x7f" in value:
        raise ValueError(f"{what} must not contain control characters")
    return value


class JobRequest(Strict):
    """A job submission (**contract**)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    project: Annotated[StrictStr, Field(pattern=CODE_RE)]
    script: Annotated[StrictStr, Field(min_length=1)]
    time_limit_minutes: Annotated[StrictInt, Field(ge=1, le=525_600)]
    cluster: Annotated[StrictStr, Field(pattern=CODE_RE)] | None = None
    partition: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] | None = None
    name: Annotated[StrictStr, Field(min_length=1, max_length=128)] = "job"
    nodes: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1
    ntasks_per_node: Annotated[StrictInt, Field(ge=1, le=4096)] = 1
    cpus_per_task: Annotated[StrictInt, Field(ge=1, le=4096)] = 1
    gpus_per_node: Annotated[StrictInt, Field(ge=0, le=64)] = 0
    memory_per_node_mb: Annotated[StrictInt, Field(ge=1, le=64 * 1024 * 1024)] | None = None
    environment: dict[StrictStr, StrictStr] = Field(default_factory=dict, max_length=256)
    working_directory: Annotated[StrictStr, Field(min_length=1, max_length=4096)] | None = None

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


class EstimateOut(BaseModel):
    allowed: bool
    denials: list[DenialOut]
    estimated_cost: Money | None
    remaining: Money | None


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


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class ProjectIn(Strict):
    code: Annotated[str, Field(pattern=CODE_RE)]
    title: Annotated[str, Field(min_length=1, max_length=500)]
    status: Literal["pending", "active", "suspended", "closed"] = "active"
    start_date: date | None = None
    end_date: date | None = None
    access_mode: Annotated[str, Field(pattern=CODE_RE)] = "playground"
    attributes: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _dates(self) -> ProjectIn:
        if self.start_date and self.end_date and self.end_date < self.start_date:
            raise ValueError("end_date is before start_date")
        return self


class ProjectPatch(Strict):
    title: Annotated[str, Field(min_length=1, max_length=500)] | None = None
    status: Literal["pending", "active", "suspended", "closed"] | None = None
    start_date: date | None = None
    end_date: date | None = None
    access_mode: Annotated[str, Field(pattern=CODE_RE)] | None = None
    attributes: dict[str, Any] | None = None


class AllocationIn(Strict):
    cluster: Annotated[str, Field(pattern=CODE_RE)]
    unit: UNITS
    amount: Amount
    start_date: date | None = None
    end_date: date | None = None
    account: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    thresholds: list[Annotated[float, Field(gt=0, le=1000)]] | None = None

    @model_validator(mode="after")
    def _dates(self) -> AllocationIn:
        if self.start_date and self.end_date and self.end_date < self.start_date:
            raise ValueError("end_date is before start_date")
        return self


class AllocationPatch(Strict):
    amount: Amount | None = None
    start_date: date | None = None
    end_date: date | None = None
    account: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] | None = None
    thresholds: list[Annotated[float, Field(gt=0, le=1000)]] | None = None
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


class ClusterIn(Strict):
    name: Annotated[str, Field(pattern=CODE_RE)]
    adapter: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    description: Annotated[str, Field(max_length=1000)] = ""
    connection: dict[str, Any] = Field(default_factory=dict)
    cost_model: dict[str, Any] = Field(default_factory=dict)
    default_partition: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] | None = None
    poll_interval_seconds: Annotated[float, Field(ge=0.2, le=3600)] | None = None
    enforce_budgets: bool = False


class ClusterPatch(Strict):
    description: Annotated[str, Field(max_length=1000)] | None = None
    connection: dict[str, Any] | None = None
    cost_model: dict[str, Any] | None = None
    default_partition: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] | None = None
    poll_interval_seconds: Annotated[float, Field(ge=0.2, le=3600)] | None = None
    state: Literal["online", "draining", "offline"] | None = None
    enforce_budgets: bool | None = None


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


class AccountIn(Strict):
    username: Annotated[str, Field(pattern=POSIX_RE)]


class AccountOut(BaseModel):
    cluster: str
    user: str
    username: str


class HealthOut(BaseModel):
    cluster: str
    ok: bool
    detail: str
    latency_ms: float | None
    checks: dict[str, Any]
