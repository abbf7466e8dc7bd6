"""Per-user submission rate limit (``rate_limit_per_minute``; 0 = off).

A sliding one-minute window kept in memory per process: with N API replicas the
effective limit is up to N times the setting (documented; a shared limiter would
need Redis, which the embedded mode must not require)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from broker.errors import RateLimited


class RateLimiter:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}

    def check(self, key: str) -> None:
        """Record one call by ``key``; raise :class:`RateLimited` (429) over the limit."""
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and now - hits[0] >= 60.0:
                hits.popleft()
            if len(hits) >= self.per_minute:
                retry = max(1, math.ceil(60.0 - (now - hits[0])))
                raise RateLimited(f"More than {self.per_minute} submissions in a minute; retry later.",
                                  retry_after=retry)
            hits.append(now)
