"""Version-neutral records the translation layers produce and consume.

Each API version has its own translation layer (``adapters.slurm_rest.layers``)
turning its JSON into these records and these records into its JSON; the
adapter's logic above works on these records only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from adapters.slurm_common.arrays import ArrayPart


@dataclass(frozen=True)
class SubmitRequest:
    """A job to submit, already tagged and validated by the adapter."""

    script: str
    name: str
    account: str
    comment: str
    time_limit_minutes: int
    working_directory: str
    environment: Mapping[str, str]
    partition: str | None = None
    nodes: int = 1
    ntasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    memory_per_node_mb: int | None = None
    ntasks: int | None = None
    min_nodes: int | None = None
    gpu_type: str | None = None
    exclusive: bool = False
    constraint: str | None = None
    mail_type: str | None = None
    mail_user: str | None = None
    array: str | None = None
    dependency: str | None = None

    @property
    def tasks(self) -> int:
        """Total tasks: ``--ntasks`` when given, else nodes × tasks per node."""
        return self.ntasks if self.ntasks is not None else self.nodes * self.ntasks_per_node

    @property
    def gpu_spec(self) -> str:
        """``[type:]N`` of the GPU request."""
        return f"{self.gpu_type}:{self.gpus_per_node}" if self.gpu_type else str(self.gpus_per_node)

    def optional_fields(self) -> dict[str, str]:
        """Job description fields that are plain strings in every version."""
        out = {"constraints": self.constraint, "mail_user": self.mail_user, "array": self.array,
               "dependency": self.dependency}
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class SlurmJob:
    """A job as the queue (slurmctld) or accounting (slurmdbd) reports it."""

    job_id: str
    states: tuple[str, ...]
    name: str | None = None
    user: str | None = None
    account: str | None = None
    partition: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    submit_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    elapsed_seconds: int | None = None
    time_limit_minutes: int | None = None
    alloc_tres: Mapping[str, float] = field(default_factory=dict)
    comment: str | None = None
    stdout_path: str | None = None
    sluid: str | None = None
    from_accounting: bool = False
    #: an array task, or the record of an array's pending tasks
    array: ArrayPart | None = None


@dataclass(frozen=True)
class AccountingQuery:
    """One slurmdb ``jobs`` query over the window from ``lookback_seconds`` to
    ``until_seconds`` ago (None: now). Without ``states`` slurmdbd returns the jobs
    eligible or running at some point of the window; with end states, the jobs in
    those states whose end falls in it."""

    lookback_seconds: int
    accounts: Sequence[str] = ()
    users: Sequence[str] = ()
    job_names: Sequence[str] = ()
    until_seconds: int | None = None
    states: Sequence[str] = ()


@dataclass(frozen=True)
class PartitionRecord:
    """A partition as the controller reports it."""

    name: str
    default: bool
    total_nodes: int
    total_cpus: int
    max_time_minutes: int | None
    tres: Mapping[str, float]
    up: bool = True


@dataclass(frozen=True)
class NodeRecord:
    """A node as the controller reports it."""

    name: str
    cpus: int
    real_memory_mb: int
    gpus: int
    partitions: tuple[str, ...]


@dataclass(frozen=True)
class PingResult:
    """One controller's answer to ``ping``."""

    hostname: str
    up: bool
    latency_us: int | None = None
