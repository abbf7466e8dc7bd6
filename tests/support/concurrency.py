"""Run the same work in several threads released at once (replicas racing)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import sqlalchemy as sa

from broker.db import make_engine

T = TypeVar("T")


def race_replicas(engine: sa.Engine, work: Callable[[sa.Engine], T], *, replicas: int = 2,
                  timeout: float = 60.0) -> Sequence[T]:
    """``work`` run by ``replicas`` threads, each on its own engine (as separate broker
    processes would be), released together by a barrier; their results (one per
    replica that finished in ``timeout``)."""
    engines = [make_engine(str(engine.url.render_as_string(hide_password=False))) for _ in range(replicas)]
    results: list[T] = []
    gate = threading.Barrier(replicas)

    def replica(own: sa.Engine) -> None:
        gate.wait()
        results.append(work(own))

    threads = [threading.Thread(target=replica, args=(e,)) for e in engines]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
    finally:
        for e in engines:
            e.dispose()
    return results
