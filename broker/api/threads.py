"""The worker-thread hop of the API's sync endpoints, without anyio's per-call machinery.

FastAPI runs a sync endpoint through ``anyio.to_thread.run_sync``: an extra event-loop
iteration (a checkpoint), the capacity limiter as an async context, a cancel scope, and
a ``queue.Queue`` whose ``put`` and ``get`` are Python-level condition variables —
~0.22 M instructions of a ~1.8 M GET of one job (bench/instructions.py), more than the
job's read. :func:`run_in_worker` does the same hop with a C ``SimpleQueue`` per
thread and one ``call_soon_threadsafe`` back.

The bound is unchanged: each call holds a token of anyio's default thread limiter (the
one FastAPI and Starlette use, set to ``worker_threads`` by broker/api/middleware.py)
while its thread runs, so these threads and anyio's together never exceed it, and the
database pool stays sized for them (broker/config.py). When no token is free, the call
takes anyio's path, which waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

from anyio import CapacityLimiter, WouldBlock, to_thread

T = TypeVar("T")

_Item = tuple[asyncio.AbstractEventLoop, contextvars.Context, Callable[..., Any], dict[str, Any],
              "asyncio.Future[Any]", CapacityLimiter, object]


class _Worker(threading.Thread):
    """A daemon thread running the calls put on its queue, one at a time. Workers are
    shared by every event loop of the process and never stop; there are at most as
    many as calls ran at once (bounded by the limiters' tokens)."""

    def __init__(self) -> None:
        # not "aifa-…": those are the background threads (tracker, notifier, streams)
        super().__init__(name="api-worker", daemon=True)
        self.queue: SimpleQueue[_Item] = SimpleQueue()

    def run(self) -> None:
        while True:
            loop, context, fn, kwargs, future, limiter, borrower = self.queue.get()
            result: Any = None
            error: BaseException | None = None
            try:
                result = context.run(fn, **kwargs)
            except BaseException as exc:  # handed to the awaiting request, as anyio does
                error = exc
            _idle.append(self)  # ready for the next call: its queue holds it until then
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits any more
                loop.call_soon_threadsafe(_done, future, result, error, limiter, borrower)
            del result, error, fn, kwargs, context, future


#: workers waiting for a call (list.append/pop are atomic)
_idle: list[_Worker] = []


def _done(future: asyncio.Future[Any], result: Any, error: BaseException | None, limiter: CapacityLimiter,
          borrower: object) -> None:
    # on the event loop: the token is given back when the thread is free, also when the
    # request was cancelled meanwhile (the bound counts threads, not waiting requests)
    limiter.release_on_behalf_of(borrower)
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    elif isinstance(error, StopIteration):  # a future refuses StopIteration
        future.set_exception(RuntimeError("the endpoint raised StopIteration"))
    else:
        future.set_exception(error)


async def run_in_worker(fn: Callable[..., T], kwargs: dict[str, Any]) -> T:
    """``fn(**kwargs)`` in a worker thread, in a copy of the caller's context."""
    limiter = to_thread.current_default_thread_limiter()
    borrower = object()
    try:
        limiter.acquire_on_behalf_of_nowait(borrower)
    except WouldBlock:  # every token taken: anyio's path waits for one
        return await to_thread.run_sync(functools.partial(fn, **kwargs))
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    try:
        worker = _idle.pop()
    except IndexError:
        worker = _Worker()
        try:
            worker.start()
        except BaseException:
            limiter.release_on_behalf_of(borrower)
            raise
    worker.queue.put((loop, contextvars.copy_context(), fn, kwargs, future, limiter, borrower))
    return await future
