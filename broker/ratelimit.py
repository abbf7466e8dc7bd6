"""Per-user submission rate limit (``rate_limit_per_minute``; 0 = off).

A sliding one-minute window per user, kept either

- **in the process** (``rate_limit_storage_url`` unset — the embedded default, one
  process): with N replicas the effective limit would be up to N times the setting;
- or in a **shared store** (``rate_limit_storage_url = "redis://host:6379/0"``, through
  the ``limits`` library's moving window): every replica counts against the same
  window, so the limit holds for the whole deployment.

A shared store that cannot be reached lets the submission through (logged and
counted in ``aifa_rate_limit_store_errors_total``): the limit protects the broker
and the clusters from floods, it is not a budget, and an outage of the store must
not stop every submission.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any, Protocol

from broker.errors import RateLimited
from broker.metrics import RATE_LIMIT_STORE_ERRORS

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
KEY_PREFIX = "aifa-broker"
#: a shared store that does not answer within this is treated as unreachable
STORE_TIMEOUT_SECONDS = 0.5


class Limiter(Protocol):
    """What the API calls before each submission."""

    per_minute: int

    def check(self, key: str) -> None:
        """Record one call by ``key``; raise :class:`RateLimited` (429) over the limit."""


def _refuse(per_minute: int, retry_after: float) -> RateLimited:
    return RateLimited(f"More than {per_minute} submissions in a minute; retry later.",
                       retry_after=max(1, math.ceil(retry_after)))


class RateLimiter:
    """In-process sliding window (one process: the embedded default)."""

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
            while hits and now - hits[0] >= WINDOW_SECONDS:
                hits.popleft()
            if len(hits) >= self.per_minute:
                raise _refuse(self.per_minute, WINDOW_SECONDS - (now - hits[0]))
            hits.append(now)


class SharedRateLimiter:
    """Moving window in a store shared by every replica (``limits`` storage URL)."""

    def __init__(self, per_minute: int, storage_url: str) -> None:
        from limits import RateLimitItemPerMinute
        from limits.storage import storage_from_string
        from limits.strategies import MovingWindowRateLimiter

        self.per_minute = per_minute
        self._item = RateLimitItemPerMinute(max(per_minute, 1))
        options: dict[str, Any] = {}
        if storage_url.startswith(("redis://", "rediss://")):
            options = {"key_prefix": KEY_PREFIX, "socket_timeout": STORE_TIMEOUT_SECONDS,
                       "socket_connect_timeout": STORE_TIMEOUT_SECONDS}
        self._storage = storage_from_string(storage_url, **options)
        self._limiter = MovingWindowRateLimiter(self._storage)

    def check(self, key: str) -> None:
        """Record one call by ``key``; raise :class:`RateLimited` (429) over the limit."""
        if self.per_minute <= 0:
            return
        try:
            allowed = self._limiter.hit(self._item, "submit", key)
            if allowed:
                return
            stats = self._limiter.get_window_stats(self._item, "submit", key)
        except Exception as exc:  # any store failure: let the call through (see module doc)
            RATE_LIMIT_STORE_ERRORS.inc()
            log.warning("rate-limit store unreachable, submission let through: %s", type(exc).__name__)
            return
        raise _refuse(self.per_minute, stats.reset_time - time.time())

    def reset(self, key: str) -> None:
        """Forget ``key``'s window (tests, operators lifting a user's block)."""
        self._limiter.clear(self._item, "submit", key)


def make_rate_limiter(per_minute: int, storage_url: str | None) -> Limiter:
    """The limiter the settings ask for: shared when a store URL is set, else in-process."""
    if storage_url and per_minute > 0:
        return SharedRateLimiter(per_minute, storage_url)
    return RateLimiter(per_minute)
