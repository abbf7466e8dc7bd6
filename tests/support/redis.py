"""The machine's Redis (127.0.0.1:6379, in CI too) for the shared rate-limit tests."""

from __future__ import annotations

import os
import socket

import pytest

REDIS_URL = os.environ.get("AIFA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> str:
    """The Redis URL; skip (fail in CI) when it does not answer PING."""
    host, _, port = REDIS_URL.split("//", 1)[1].split("/", 1)[0].partition(":")
    reason = None
    try:
        with socket.create_connection((host, int(port or 6379)), timeout=2) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                reason = f"{REDIS_URL} does not answer PING"
    except OSError as exc:
        reason = f"Redis not reachable at {REDIS_URL}: {exc}"
    if reason:
        if os.environ.get("CI") == "true" or os.environ.get("AIFA_REQUIRE_REDIS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return REDIS_URL
