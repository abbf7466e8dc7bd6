"""A broker whose only extra cluster answers at once (B3: admission without a scheduler).

``python -m bench.noop --port P --workers N`` serves the real app (settings from the
environment, as ``aifa-broker serve``) with the ``noop`` adapter registered in every
process; the cluster itself is registered through the API by the benchmark.
"""

from __future__ import annotations

import argparse
import itertools
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from broker import plugins, server
from broker.adapter import (
    ClusterAdapter,
    Health,
    JobSpec,
    JobState,
    JobStatus,
    PartitionInfo,
    SchedulerJobRef,
    UsageRecord,
)
from broker.config import Settings, get_settings


class NoopAdapter(ClusterAdapter):
    """Accepts every job at once; every job stays RUNNING; nothing runs anywhere."""

    def __init__(self, name: str, settings: Mapping[str, Any], *, data_dir: str) -> None:
        super().__init__(name, settings, data_dir=data_dir)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def submit(self, spec: JobSpec) -> SchedulerJobRef:
        with self._lock:
            job_id = str(next(self._ids))
        return SchedulerJobRef(job_id=job_id, username=spec.username, tag=spec.tag,
                               submit_time=datetime.now(UTC))

    def poll(self, refs: Sequence[SchedulerJobRef]) -> list[JobStatus]:
        return [JobStatus(job_id=r.job_id, state=JobState.RUNNING, raw_state="RUNNING", final=False)
                for r in refs]

    def cancel(self, ref: SchedulerJobRef) -> None:
        return None

    def find_by_tag(self, tags: Sequence[str], *, since: datetime | None = None) -> dict[str, SchedulerJobRef]:
        return {}

    def usage(self, since: datetime, *, accounts: Sequence[str] | None = None) -> list[UsageRecord]:
        return []

    def read_output(self, ref: SchedulerJobRef, stream: str = "stdout", tail: int = 65536) -> str:
        return ""

    def health(self) -> Health:
        return Health(ok=True, detail="noop")

    def discover(self) -> list[PartitionInfo]:
        return [PartitionInfo(name="cpu", default=True, nodes=1000, cpus_per_node=128,
                              memory_per_node_mb=512_000, tres={"cpu": 128_000})]


def install() -> None:
    """Register the ``noop`` adapter in this process."""
    plugins.register(plugins.ADAPTER_GROUP, "noop", NoopAdapter)


def worker_app() -> Any:
    """A worker of ``serve --workers N`` with the noop adapter."""
    install()
    return server.worker_app()


def single_app(settings: Settings) -> Any:
    install()
    from broker.api.app import create_app

    return create_app(settings)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=server.default_workers())
    args = ap.parse_args()
    settings = get_settings()
    server.run(settings, host="127.0.0.1", port=args.port, workers=args.workers,
               factory="bench.noop:worker_app", single=single_app)


if __name__ == "__main__":
    main()
