"""What a contract-suite target provides. Each adapter adds a ``factory_<name>.py``
beside this file exposing ``targets() -> list[pytest.param]`` whose values are
zero-argument callables returning a :class:`ContractTarget` (or calling
``pytest.skip`` with the reason the target cannot run here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from broker.adapter import ClusterAdapter


@dataclass
class ContractTarget:
    adapter: ClusterAdapter
    #: builds an adapter for the same cluster that cannot reach it (health when down)
    unreachable: Callable[[], ClusterAdapter]
    username: str = "alice"
    account: str = "proj-a"
    cpu_partition: str | None = "cpu"
    gpu_partition: str | None = "gpu"
    #: seconds to wait for a job to reach a final, accounted state
    settle_timeout: float = 60.0
    #: run a shell command on the cluster as root (for checks like sacct); None if n/a
    run_on_cluster: Callable[[list[str]], str] | None = None
    extra: dict[str, object] = field(default_factory=dict)
