"""``pyslurm.JobSubmitDescription``, ``Job``/``Jobs``, ``Partition(s)``, ``Node(s)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.contract.pyslurm_standin._sim import (
    CONTROLLER,
    RPCError,
    SimJob,
    SimPartition,
    range_text,
    user_name,
)
from tests.contract.pyslurm_standin.db import TrackableResources

_ATTRS = (
    "name", "account", "user_id", "group_id", "comment", "working_directory", "nodes",
    "partitions", "script", "environment", "time_limit", "cpus_per_task", "ntasks",
    "ntasks_per_node", "gres_per_node", "memory_per_node", "standard_output", "standard_error", "array",
)


def _validate_script(script: Any) -> str:
    """pyslurm's documented rules: a path to an existing file is read; content needs '#!'."""
    text = str(script or "")
    try:
        if Path(text).is_file():
            text = Path(text).read_text()
    except (ValueError, OSError):
        pass
    if not text or text.isspace():
        raise ValueError("Batch script is empty or none was provided.")
    if not text.startswith("#!"):
        raise ValueError("Not a valid Batch script. First line must start with '#!'")
    if "\0" in text or "\r\n" in text:
        raise ValueError("Batch script contains NUL or DOS line breaks")
    return text


def _gpus(gres: Any) -> int:
    if not gres:
        return 0
    if isinstance(gres, dict):
        return sum(int(v) for k, v in gres.items() if k == "gpu" or k.startswith("gpu:"))
    return sum(int(item.rsplit(":", 1)[1]) for item in str(gres).split(",")
               if item.startswith("gpu"))


def _environment(env: Any) -> dict[str, str]:
    """As documented: a dict gives exactly those variables plus the caller's SLURM_*;
    nothing (the default) exports the caller's whole environment."""
    slurm = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    if not env or (isinstance(env, str) and env.casefold() == "all"):
        return dict(os.environ)
    if not isinstance(env, dict):
        raise ValueError("stand-in supports environment as dict or 'ALL' only")
    return {**slurm, **{str(k): str(v) for k, v in env.items()}}


class JobSubmitDescription:
    """Submit description; attributes as keyword arguments."""

    def __init__(self, **kwargs: Any) -> None:
        for key in _ATTRS:
            setattr(self, key, None)
        for key, value in kwargs.items():
            if key not in _ATTRS:
                raise AttributeError(f"stand-in JobSubmitDescription has no {key!r}")
            setattr(self, key, value)

    def submit(self) -> int:
        """Submit; returns the job id or raises RPCError."""
        script = _validate_script(self.script)
        ntasks = int(self.ntasks or 1)
        nodes = int(self.nodes or 1)
        job = SimJob(
            id=0, name=str(self.name or "sbatch"), account=str(self.account or "default"),
            user_name=user_name(self.user_id), partition=str(self.partitions or ""),
            comment=self.comment, working_directory=str(self.working_directory or os.getcwd()),
            standard_output=str(self.standard_output or "slurm-%j.out"),
            standard_error=str(self.standard_error or self.standard_output or "slurm-%j.out"),
            script=script, env=_environment(self.environment),
            time_limit=int(str(self.time_limit or 60)), nodes=nodes, ntasks=ntasks,
            cpus_per_task=int(self.cpus_per_task or 1), gpus_per_node=_gpus(self.gres_per_node),
            memory_mb=int(self.memory_per_node or 1024),
        )
        uid = None if self.user_id is None else int(self.user_id)
        return CONTROLLER.submit(job, uid, str(self.array) if self.array else None)


class Job:
    """A job in slurmctld's memory (read-only view)."""

    def __init__(self, job_id: int = 0, _job: SimJob | None = None) -> None:
        self._id = job_id
        self._job = _job

    def __getattr__(self, name: str) -> Any:
        job = self.__dict__.get("_job")
        if job is None:
            raise AttributeError(name)
        return getattr(job, name)

    @property
    def id(self) -> int:
        return self._job.id if self._job else self._id

    @property
    def run_time(self) -> int:
        return self._job.elapsed if self._job else 0

    # job arrays, as documented for pyslurm 25.11's Job: a started task is a record
    # of its own (its own ``id``; ``array_id`` the master id, ``array_task_id`` its
    # index); the tasks still waiting are one record (``id`` = the array's id,
    # ``array_task_id`` None, ``array_tasks_waiting`` like ``2-5`` without the
    # ``%max`` part, which is ``array_tasks_parallel``)

    @property
    def array_id(self) -> int | None:
        return (self._job.array_id or None) if self._job else None

    @property
    def array_task_id(self) -> int | None:
        return self._job.array_task_id if self._job else None

    @property
    def array_tasks_waiting(self) -> str | None:
        return range_text(self._job.array_pending) if self._job and self._job.array_pending else None

    @property
    def array_tasks_parallel(self) -> int | None:
        return (self._job.array_max or None) if self._job else None

    @property
    def allocated_tres(self) -> TrackableResources | None:
        if self._job is None or self._job.state == "PENDING":
            return None
        return TrackableResources.from_map(self._job.tres())

    @property
    def tres(self) -> TrackableResources | None:
        return None if self._job is None else TrackableResources.from_map(self._job.tres())

    @staticmethod
    def load(job_id: int) -> Job:
        """One job from slurmctld."""
        for job in CONTROLLER.queue("job_load"):
            if job.id == int(job_id):
                return Job(job.id, job)
        raise RPCError(2017, "Invalid job id specified")

    def cancel(self) -> None:
        """Cancel (SIGKILL) the job."""
        CONTROLLER.cancel(self.id)


class Jobs(dict[int, Job]):
    """Collection of jobs keyed by id."""

    @staticmethod
    def load(preload_passwd_info: bool = False, frozen: bool = False) -> Jobs:
        """Every job slurmctld knows."""
        return Jobs({j.id: Job(j.id, j) for j in CONTROLLER.queue("jobs_load")})


class Partition:
    """A partition."""

    def __init__(self, part: SimPartition) -> None:
        self.name = part.name
        self.is_default = part.default
        self.total_cpus = part.cpus * part.nodes
        self.total_nodes = part.nodes
        self.max_time = part.max_time
        self.nodes = ",".join(f"{part.name}{i}" for i in range(part.nodes))


class Partitions(dict[str, Partition]):
    """Collection of partitions keyed by name."""

    @staticmethod
    def load() -> Partitions:
        CONTROLLER.count("partitions_load")
        return Partitions({p.name: Partition(p) for p in CONTROLLER.partitions.values()})


class Node:
    """A node (each stand-in partition has its own nodes)."""

    def __init__(self, name: str, part: SimPartition) -> None:
        self.name = name
        self.partitions = [part.name]
        self.total_cpus = part.cpus
        self.real_memory = part.memory_mb
        self.configured_gres = {"gpu": part.gpus} if part.gpus else {}


class Nodes(dict[str, Node]):
    """Collection of nodes keyed by name."""

    @staticmethod
    def load(preload_passwd_info: bool = False) -> Nodes:
        CONTROLLER.count("nodes_load")
        return Nodes({f"{p.name}{i}": Node(f"{p.name}{i}", p)
                      for p in CONTROLLER.partitions.values() for i in range(p.nodes)})
