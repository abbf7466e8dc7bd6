"""``pyslurm.slurmctld`` ping functions."""

from __future__ import annotations

from dataclasses import dataclass

from tests.contract.pyslurm_standin._sim import CONTROLLER, RPCError


@dataclass
class PingResponse:
    """Answer of a controller ping."""

    is_primary: bool
    is_responding: bool
    index: int
    hostname: str
    latency: float


def ping_primary() -> PingResponse:
    """Ping the primary controller."""
    CONTROLLER.count("ping")
    return PingResponse(True, True, 0, "standin-ctld", 0.05)


def ping_backup() -> PingResponse:
    """There is no backup controller."""
    raise RPCError(msg="Invalid Index specified.")
