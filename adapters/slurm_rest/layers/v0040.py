"""slurmrestd ``v0.0.40`` (data_parser, Slurm 24.11): the base of the newer layers.

Shapes: numbers as ``{"set", "infinite", "number"}``; ``job_state`` and
accounting ``state.current`` lists; ``exit_code`` ``{"status": [...],
"return_code": {...}, "signal": {...}}``; submit body ``{"job": {"script", ...,
"environment": ["K=V", ...]}}``; GPUs only through ``tres_per_node:
"gres/gpu:N"`` — a ``gres`` field is silently ignored by these versions, so it
is never sent. ``GET jobs`` leaves finished jobs out; ``slurmdb/jobs`` filters
``users`` (``start_time`` is sent relative: see ``accounting_params``).
Collection paths end with ``/``. Partitions carry no DEFAULT flag before v0.0.45. ``DELETE job``
answers 200 without errors even when the signal was refused (checked live on
24.11): the adapter looks at the job afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from adapters.slurm_common import shapes as fields
from adapters.slurm_common import tres
from adapters.slurm_rest.layers.base import (
    ApiLayer,
    JsonObject,
    QueryParams,
    environment_pairs,
    mapping,
    text,
    window_params,
)
from adapters.slurm_rest.model import (
    AccountingQuery,
    PartitionRecord,
    PingResult,
    SubmitRequest,
)
from broker.adapter import SubmitRejected


def no_val(number: int) -> JsonObject:
    """``{"set": true, "infinite": false, "number": N}``."""
    return {"set": True, "infinite": False, "number": number}


#: sbatch --mail-type words → the REST mail flags (v0.0.40+ take a list of flags)
_MAIL_FLAGS = {
    "BEGIN": ["BEGIN"], "END": ["END"], "FAIL": ["FAIL"], "REQUEUE": ["REQUEUE"],
    "STAGE_OUT": ["STAGE_OUT"], "ARRAY_TASKS": ["ARRAY_TASKS"], "INVALID_DEPEND": ["INVALID_DEPENDENCY"],
    "TIME_LIMIT": ["TIME=100%"], "TIME_LIMIT_90": ["TIME=90%"], "TIME_LIMIT_80": ["TIME=80%"],
    "TIME_LIMIT_50": ["TIME=50%"], "ALL": ["BEGIN", "END", "FAIL", "REQUEUE", "STAGE_OUT", "INVALID_DEPENDENCY"],
    "NONE": [],
}


def mail_flags(mail_type: str) -> list[str]:
    """``BEGIN,END`` → ``["BEGIN", "END"]``; an unknown word is refused (never dropped)."""
    flags: list[str] = []
    for word in mail_type.upper().split(","):
        if word not in _MAIL_FLAGS:
            raise SubmitRejected(f"mail type {word!r} is not supported", code="unsupported_request")
        flags += [f for f in _MAIL_FLAGS[word] if f not in flags]
    return flags


class V0040(ApiLayer):
    """Slurm 24.11's ``v0.0.40``."""

    version: ClassVar[str] = "v0.0.40"
    gpu_request_field: ClassVar[str] = "tres_per_node"
    #: a refused cancel (another user's job) answers 200 without errors here
    cancel_needs_check: ClassVar[bool] = True

    # ---- requests ----------------------------------------------------------
    def submit_body(self, request: SubmitRequest) -> JsonObject:
        """``{"job": {...}}`` with the script inside and environment as a list."""
        job: JsonObject = {
            "script": request.script,
            "name": request.name,
            "account": request.account,
            "comment": request.comment,
            "time_limit": no_val(request.time_limit_minutes),
            "nodes": (f"{request.min_nodes}-{request.nodes}" if request.min_nodes else str(request.nodes)),
            "tasks": request.tasks,
            "tasks_per_node": request.ntasks_per_node,
            "cpus_per_task": request.cpus_per_task,
            "current_working_directory": request.working_directory,
            "environment": environment_pairs(request.environment),
        }
        if request.partition:
            job["partition"] = request.partition
        if request.memory_per_node_mb is not None:
            job["memory_per_node"] = no_val(request.memory_per_node_mb)
        if request.gpus_per_node:
            job["tres_per_node"] = f"gres/gpu:{request.gpu_spec}"
        if request.exclusive:
            job["shared"] = ["none"]  # JOB_SHARED_NONE: what sbatch --exclusive sets
        if request.mail_type:
            job["mail_type"] = mail_flags(request.mail_type)
        job.update(request.optional_fields())
        return {"job": job}

    def accounting_params(self, query: AccountingQuery) -> QueryParams:
        """``start_time``/``end_time`` relative (``now-Nseconds``), filters by
        account/user/name/state, no steps. The schema says "UNIX timestamp", but
        v0.0.40/41 on 24.11 reject a bare timestamp (error 9202) while every version
        takes this. States go as the parameter repeated (a comma list is an "Unknown
        flag", error 9207, on v0.0.40-45)."""
        params = window_params(query)
        if query.states:
            params["state"] = list(query.states)
        if query.users:
            params["users"] = ",".join(query.users)
        return params

    # ---- jobs --------------------------------------------------------------
    def stdout_path(self, item: Mapping[str, Any]) -> str | None:
        """Where the job's stdout goes (expanded where the version offers it)."""
        return text(item.get("standard_output"))

    def queue_exit_code(self, value: Any) -> int | None:
        """``{"status": [...], "return_code": {...}, "signal": {...}}``."""
        return fields.exit_code(value)

    def accounting_exit_code(self, item: Mapping[str, Any]) -> int | None:
        """The same object shape as the queue's."""
        return fields.exit_code(item.get("exit_code"))

    def limit_minutes(self, value: Any) -> int | None:
        """A number object; unset, infinite or 0 → None."""
        return _minutes(value)

    def stdout_path_accounting(self, item: Mapping[str, Any]) -> str | None:
        """Accounting has no stdout path before v0.0.42 on 26.05."""
        return text(item.get("stdout_expanded")) or text(item.get("stdout"))

    # ---- controller --------------------------------------------------------
    def parse_ping(self, item: Mapping[str, Any]) -> PingResult:
        """``{"hostname", "pinged": "UP", "latency", "mode"}``."""
        return PingResult(
            hostname=text(item.get("hostname")) or "?",
            up=str(item.get("pinged", "")).upper() == "UP",
            latency_us=fields.as_int(item.get("latency")),
        )

    def partition_is_default(self, item: Mapping[str, Any]) -> bool:
        """v0.0.40-44 do not report the DEFAULT flag."""
        return False

    def parse_partition(self, item: Mapping[str, Any]) -> PartitionRecord:
        """Nested partition object (``nodes.total``, ``maximums.time``...)."""
        nodes = mapping(item.get("nodes"))
        cpus = mapping(item.get("cpus"))
        maximums = mapping(item.get("maximums"))
        states = fields.state_words(mapping(item.get("partition")).get("state")) or ["UP"]
        return PartitionRecord(
            name=text(item.get("name")) or "?",
            default=self.partition_is_default(item),
            total_nodes=fields.as_int(nodes.get("total")) or 0,
            total_cpus=fields.as_int(cpus.get("total")) or 0,
            max_time_minutes=_minutes(maximums.get("time")),
            tres=tres.parse_tres_string(text(mapping(item.get("tres")).get("configured"))),
            up="UP" in [s.upper() for s in states],
        )

def _minutes(value: Any) -> int | None:
    """Minutes from a number object; unset, infinite or 0 → None."""
    if fields.is_infinite(value):
        return None
    minutes = fields.as_int(value)
    return minutes if minutes and minutes > 0 else None
