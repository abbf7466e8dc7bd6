"""What a request asks the database: the first word of each statement it sends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from broker import direct
from tests.support.env import BrokerEnv


@contextmanager
def statements(env: BrokerEnv) -> Iterator[list[str]]:
    """Collect the first word (``SELECT``, ``INSERT``, ``WITH``…) of every statement
    sent on ``env``'s engine by request threads (not the tracker's or notifier's
    ``aifa-*`` threads) while the block runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not threading.current_thread().name.startswith("aifa-"):
            seen.append(statement.strip().split(None, 1)[0].upper())

    def record_direct(statement: str) -> None:  # run on the driver's cursor (broker/direct.py)
        record(None, None, statement)

    sa.event.listen(env.engine, "before_cursor_execute", record)
    direct.OBSERVERS.append(record_direct)
    try:
        yield seen
    finally:
        sa.event.remove(env.engine, "before_cursor_execute", record)
        direct.OBSERVERS.remove(record_direct)
