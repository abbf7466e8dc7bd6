"""A stand-in for ``pyslurm`` 25.11: just the API surface the pyslurm adapter uses.

Written from pyslurm's documentation (not its code). Behind it is a tiny
simulated scheduler (:mod:`._sim`) that runs each job's script as a real
subprocess, so output, environment and exit codes are real; states advance on
time: PENDING for a moment, RUNNING, then the end; the queue forgets finished
jobs after ``min_job_age`` seconds, and accounting shows the end only after
``db_lag`` seconds (so the adapter must not settle from the queue alone).

Test hooks (not pyslurm API): :data:`CONTROLLER` (configure partitions, time
scale, count calls, shut down), :func:`unreachable_api`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tests.contract.pyslurm_standin import constants, db, slurmctld
from tests.contract.pyslurm_standin._sim import CONTROLLER, PyslurmError, RPCError
from tests.contract.pyslurm_standin.core import (
    Job,
    Jobs,
    JobSubmitDescription,
    Node,
    Nodes,
    Partition,
    Partitions,
)

__version__ = "25.11.0+standin"

__all__ = [
    "CONTROLLER", "Job", "JobSubmitDescription", "Jobs", "Node", "Nodes", "Partition",
    "Partitions", "PyslurmError", "RPCError", "constants", "db", "slurmctld", "unreachable_api",
]


def unreachable_api() -> Any:
    """A pyslurm look-alike whose every RPC fails as if slurmctld were down."""

    def down(*_a: Any, **_k: Any) -> Any:
        raise RPCError(1800, "Unable to contact slurm controller (connect failure)")

    loader = SimpleNamespace(load=down, open=down)
    return SimpleNamespace(
        RPCError=RPCError, PyslurmError=PyslurmError, constants=constants,
        JobSubmitDescription=JobSubmitDescription, Job=down, Jobs=loader, Partitions=loader,
        Nodes=loader, slurmctld=SimpleNamespace(ping_primary=down, ping_backup=down),
        db=SimpleNamespace(Jobs=loader, Job=loader, JobFilter=db.JobFilter, Connection=loader),
    )
