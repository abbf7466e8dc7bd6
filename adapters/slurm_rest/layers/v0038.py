"""slurmrestd ``v0.0.38`` / ``dbv0.0.38`` (Slurm 22.05, no data_parser).

Shapes: plain integers (0 = unset) for times and limits; ``job_state`` a string;
queue ``exit_code`` a raw wait status; accounting ``exit_code`` ``{"status",
"return_code"}`` and ``state.current`` a string; submit body ``{"script",
"job": {...}}`` with ``environment`` a required object and GPUs as ``gres``.
``slurmdb/jobs`` has no ``users`` filter (users are filtered client-side).
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

_INFINITE_32 = 0xFFFFFFFF
_NO_VAL_32 = 0xFFFFFFFE


def wait_status_exit_code(status: Any) -> int | None:
    """Exit code from a raw wait status integer: ``256`` → 1; signal N → 128 + N."""
    value = fields.as_int(status)
    if value is None or value < 0:
        return None
    signal = value & 0x7F
    return 128 + signal if signal else (value >> 8) & 0xFF


def accounting_exit_code(state: Any) -> int | None:
    """22.05's accounting JSON reports ``{"status": "SUCCESS", "return_code": 0}``
    for every job, even one that exited 3 or timed out (``sacct -P`` shows
    ``3:0``/``0:15`` for the same jobs). Only a COMPLETED job's 0 is certain;
    otherwise the code is unknown here (the queue's wait status fills it in)."""
    words = {w.upper() for w in fields.state_words(state)}
    return 0 if words == {"COMPLETED"} else None


class V0038(ApiLayer):
    """Slurm 22.05's ``v0.0.38``."""

    version: ClassVar[str] = "v0.0.38"
    collection_suffix: ClassVar[str] = ""
    gpu_request_field: ClassVar[str] = "gres"

    def submit_body(self, request: SubmitRequest) -> JsonObject:
        """``{"script": ..., "job": {...}}``; environment as an object (required)."""
        job: JsonObject = {
            "name": request.name,
            "account": request.account,
            "comment": request.comment,
            "time_limit": request.time_limit_minutes,
            "nodes": [request.min_nodes or request.nodes, request.nodes],
            "tasks": request.tasks,
            "tasks_per_node": request.ntasks_per_node,
            "cpus_per_task": request.cpus_per_task,
            "current_working_directory": request.working_directory,
            "environment": dict(request.environment),
        }
        if request.partition:
            job["partition"] = request.partition
        if request.memory_per_node_mb is not None:
            job["memory_per_node"] = request.memory_per_node_mb
        if request.gpus_per_node:
            job["gres"] = f"gpu:{request.gpu_spec}"
        if request.exclusive:
            # the schema's enum says "true", but 22.05's parser (arg_set_data_exclusive)
            # takes sbatch's words: "exclusive" = JOB_SHARED_NONE ("true" is refused)
            job["exclusive"] = "exclusive"
        if request.mail_type:
            job["mail_type"] = request.mail_type
        job.update(request.optional_fields())
        return {"script": request.script, "job": job}

    def accounting_params(self, query: AccountingQuery) -> QueryParams:
        """No ``users`` filter exists in dbv0.0.38; the caller filters users itself.
        States go as one comma list (a repeated ``state`` counts only once: "Nothing
        found" on 22.05)."""
        params = window_params(query)
        if query.states:
            params["state"] = ",".join(query.states)
        return params

    def queue_exit_code(self, value: Any) -> int | None:
        """The queue's ``exit_code`` is a raw wait status."""
        return wait_status_exit_code(value)

    def accounting_exit_code(self, item: Mapping[str, Any]) -> int | None:
        """Only what ``state.current`` proves (see :func:`accounting_exit_code`)."""
        return accounting_exit_code(mapping(item.get("state")).get("current"))

    def limit_minutes(self, value: Any) -> int | None:
        """Plain integers, 0/INFINITE/NO_VAL meaning none."""
        return _limit(value)

    def parse_ping(self, item: Mapping[str, Any]) -> PingResult:
        """``{"hostname", "ping": "UP"|"DOWN", "mode", "status"}``."""
        return PingResult(
            hostname=text(item.get("hostname")) or "?",
            up=str(item.get("ping", "")).upper() == "UP",
        )

    def parse_partition(self, item: Mapping[str, Any]) -> PartitionRecord:
        """Flat 22.05 partition object; ``flags`` contains ``default``."""
        flags = [str(f).lower() for f in item.get("flags") or [] if isinstance(f, str)]
        return PartitionRecord(
            name=text(item.get("name")) or "?",
            default="default" in flags,
            total_nodes=fields.as_int(item.get("total_nodes")) or 0,
            total_cpus=fields.as_int(item.get("total_cpus")) or 0,
            max_time_minutes=_limit(item.get("max_time_limit")),
            tres=tres.parse_tres_string(text(item.get("tres"))),
            up=str(item.get("state", "UP")).upper() == "UP",
        )

def _limit(value: Any) -> int | None:
    """Minutes; unlimited/unset (0, INFINITE, NO_VAL) → None."""
    minutes = fields.as_int(value)
    if minutes is None or minutes <= 0 or minutes in (_INFINITE_32, _NO_VAL_32):
        return None
    return minutes
