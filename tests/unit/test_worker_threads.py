"""The API's worker-thread hop (broker/api/threads.py): anyio's thread bound kept,
results, errors and context carried, a token held until the thread is free."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest
from anyio import to_thread

from broker.api.threads import run_in_worker

REQUEST = contextvars.ContextVar("request", default="none")


def test_calls_run_in_threads_within_anyio_s_bound() -> None:
    running, most, lock = [0], [0], threading.Lock()
    loop_thread: list[int] = []

    def work(i: int) -> tuple[int, str, bool]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return i, REQUEST.get(), threading.get_ident() != loop_thread[0]

    async def one(i: int) -> tuple[int, str, bool]:
        REQUEST.set(f"r{i}")
        return await run_in_worker(work, {"i": i})

    async def scenario() -> list[tuple[int, str, bool]]:
        loop_thread.append(threading.get_ident())
        limiter = to_thread.current_default_thread_limiter()
        limiter.total_tokens = 3
        # beside calls through anyio itself, which share the tokens
        results = await asyncio.gather(*(one(i) for i in range(12)),
                                       *(to_thread.run_sync(work, 100 + i) for i in range(3)))
        assert limiter.borrowed_tokens == 0
        return results[:12]

    results = asyncio.run(scenario())
    assert results == [(i, f"r{i}", True) for i in range(12)]  # each in a thread, in its caller's context
    assert most[0] == 3  # never more threads at once than the limiter's tokens


def test_an_error_reaches_the_caller() -> None:
    def fail() -> None:
        raise KeyError("gone")

    def stop() -> None:
        raise StopIteration

    async def scenario() -> None:
        with pytest.raises(KeyError, match="gone"):
            await run_in_worker(fail, {})
        with pytest.raises(RuntimeError, match="StopIteration"):
            await run_in_worker(stop, {})
        assert to_thread.current_default_thread_limiter().borrowed_tokens == 0

    asyncio.run(scenario())


def test_a_cancelled_call_holds_its_token_until_its_thread_is_free() -> None:
    release = threading.Event()

    async def scenario() -> None:
        limiter = to_thread.current_default_thread_limiter()
        task = asyncio.create_task(run_in_worker(release.wait, {"timeout": 5}))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert limiter.borrowed_tokens == 1  # the thread still runs
        release.set()
        for _ in range(100):
            if limiter.borrowed_tokens == 0:
                break
            await asyncio.sleep(0.01)
        assert limiter.borrowed_tokens == 0

    asyncio.run(scenario())
