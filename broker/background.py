"""A background loop: one daemon thread running a cycle again and again until stopped.

The tracker and the usage importer are such loops (each on its own thread and
schedule); this holds what they share — start, stop, and a loop that survives any
single failed cycle (logged, then the next cycle after the usual pause).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class BackgroundLoop:
    """Runs :meth:`run_cycle` on a daemon thread named :attr:`thread_name`, pausing
    :meth:`pause_seconds` between cycles, until :meth:`stop`."""

    #: the thread's name (``aifa-…``: tests tell the broker's own threads by it)
    thread_name = "aifa-loop"
    #: what a failed cycle is logged as
    failure_message = "background cycle failed"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the loop's thread."""
        self._thread = threading.Thread(target=self.run_forever, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end and wait up to ``timeout`` seconds for its thread."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        """Cycle until stopped; a cycle that raises is logged and the loop goes on."""
        while not self._stop.is_set():
            try:
                self.run_cycle()
            except Exception:  # the loop must survive any single failure
                log.exception(self.failure_message)
            self._stop.wait(self.pause_seconds())

    def run_cycle(self) -> Any:
        """One pass of the loop's work."""
        raise NotImplementedError

    def pause_seconds(self) -> float:
        """The pause between two cycles."""
        raise NotImplementedError
