"""``pyslurm.db``: Job, Jobs, JobFilter, Connection, TrackableResources."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tests.contract.pyslurm_standin._sim import CONTROLLER, TERMINAL, RPCError, SimJob, hex_bitmap


class TrackableResource:
    """One TRES with a count."""

    def __init__(self, tres_type: str, count: float, name: str | None = None) -> None:
        self.type, self.count, self.name = tres_type, count, name


class GPU(TrackableResource):
    """A GPU TRES (``gres/gpu``)."""


class TrackableResources:
    """cpu/mem/node/billing attributes plus a ``gres`` dict (``{"gpu": GPU}``)."""

    def __init__(self) -> None:
        self.cpu = self.mem = self.node = self.billing = None
        self.gres: dict[str, TrackableResource] = {}

    @staticmethod
    def from_map(tres: dict[str, float]) -> TrackableResources:
        out = TrackableResources()
        for key, value in tres.items():
            if key == "gres/gpu":
                out.gres["gpu"] = GPU("gres", value, "gpu")
            else:
                setattr(out, key, TrackableResource(key, value))
        return out


def _ts(value: Any) -> int | None:
    if value is None:
        return None
    return int(value.timestamp()) if isinstance(value, datetime) else int(value)


class JobFilter:
    """Accounting search filter (the fields the adapter uses)."""

    def __init__(self, ids: list[int] | None = None, start_time: Any = None,
                 end_time: Any = None, accounts: list[str] | None = None,
                 users: list[str] | None = None, names: list[str] | None = None) -> None:
        self.ids, self.accounts, self.users, self.names = ids, accounts, users, names
        self.start_time, self.end_time = _ts(start_time), _ts(end_time)

    def matches(self, job: SimJob) -> bool:
        # an array's id selects every task of it, as ``sacct -j <array id>`` does
        checks = [
            self.ids is None or job.id in self.ids or (bool(job.array_id) and job.array_id in self.ids),
            self.accounts is None or job.account in self.accounts,
            self.users is None or job.user_name in self.users,
            self.names is None or job.name in self.names,
            self.start_time is None or not job.end_time or job.end_time >= self.start_time,
            self.end_time is None or job.submit_time <= self.end_time,
        ]
        return all(checks)


class Job:
    """A job as slurmdbd records it."""

    def __init__(self, job: SimJob, state: str) -> None:
        self._job, self.state = job, state
        final = state in TERMINAL
        self.id, self.name, self.account = job.id, job.name, job.account
        self.user_name, self.partition, self.comment = job.user_name, job.partition, job.comment
        self.working_directory = job.working_directory
        self.submit_time, self.start_time = job.submit_time, job.start_time
        self.end_time = job.end_time if final else 0
        self.elapsed_time = job.elapsed
        self.exit_code = job.exit_code if final else 0
        self.exit_code_signal = job.exit_code_signal if final else 0
        self.allocated_tres = (TrackableResources.from_map(job.tres()) if job.start_time
                               else None)
        self.tres = self.allocated_tres
        # an array task's record, or the record of its waiting tasks, whose
        # ``array_tasks_waiting`` is slurmdbd's stored form: a hexadecimal bitmap
        # (``0x3C`` = tasks 2-5; ``sacct --json`` shows the same in ``array.task``)
        self.array_id = job.array_id or None
        self.array_task_id = job.array_task_id
        self.array_tasks_waiting = hex_bitmap(job.array_pending) if job.array_pending else None
        self.array_tasks_parallel = job.array_max or None


class Jobs(dict[int, Job]):
    """Collection of accounting jobs keyed by id."""

    @staticmethod
    def load(db_filter: JobFilter | None = None, db_connection: Any = None) -> Jobs:
        """Jobs matching ``db_filter``."""
        filt = db_filter or JobFilter()
        return Jobs({j.id: Job(j, state) for j, state in CONTROLLER.accounting("db_jobs_load")
                     if filt.matches(j)})


class Connection:
    """A slurmdbd connection."""

    @staticmethod
    def open() -> Connection:
        CONTROLLER.count("db_open")
        return Connection()

    def close(self) -> None:
        """Close it."""


__all__ = ["GPU", "Connection", "Job", "JobFilter", "Jobs", "RPCError", "TrackableResource",
           "TrackableResources"]
