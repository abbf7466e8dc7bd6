"""Admission control and the pool/thread configuration check (issue 14 points 1-2)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker.api.app import UnsafeConfiguration, check_pool
from broker.api.middleware import RETRY_AFTER_SECONDS, Admission, leave_admission
from broker.config import Settings
from broker.db import make_engine


def _scope(path: str) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}


async def _call(app: Any, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(path), receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_beyond_the_limit_the_answer_is_an_immediate_503_and_probes_still_answer() -> None:
    release = asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/v1/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    admission = Admission(slow_app, limit=2, threads=4)  # no waiting: refused at once

    async def scenario() -> None:
        held = [asyncio.create_task(_call(admission, "/v1/slow")) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert admission.in_flight == 2
        status, headers, body = await asyncio.wait_for(_call(admission, "/v1/jobs"), 1)
        assert status == 503
        assert headers[b"content-type"] == b"application/problem+json"
        assert int(headers[b"retry-after"]) >= 1
        assert json.loads(body)["code"] == "overloaded"
        for probe in ("/healthz", "/metrics", "/readyz"):  # not counted, not refused
            assert (await asyncio.wait_for(_call(admission, probe), 1))[0] == 200
        release.set()
        assert [(await t)[0] for t in held] == [200, 200]
        assert admission.in_flight == 0
        assert (await _call(admission, "/v1/jobs"))[0] == 200

    asyncio.run(scenario())


def _gated_app(release: asyncio.Event, order: list[str]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/v1/slow":
            await release.wait()
        order.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


def test_beyond_the_limit_a_request_waits_for_a_slot_first_come_first_served() -> None:
    release, order = asyncio.Event(), []
    admission = Admission(_gated_app(release, order), limit=1, threads=4, wait_seconds=5, queue=4)

    async def scenario() -> None:
        held = asyncio.create_task(_call(admission, "/v1/slow"))
        await asyncio.sleep(0.02)
        waiting = []
        for name in ("/v1/a", "/v1/b", "/v1/c"):
            waiting.append(asyncio.create_task(_call(admission, name)))
            await asyncio.sleep(0.01)
        assert len(admission.waiting) == 3 and admission.in_flight == 1
        # a newcomer does not overtake the waiting ones, even once a slot is free
        release.set()
        late = asyncio.create_task(_call(admission, "/v1/late"))
        assert [(await t)[0] for t in (held, *waiting, late)] == [200] * 5
        assert order == ["/v1/slow", "/v1/a", "/v1/b", "/v1/c", "/v1/late"]
        assert admission.in_flight == 0 and not admission.waiting

    asyncio.run(scenario())


def test_the_wait_is_bounded_in_time_and_in_length_then_503() -> None:
    release, order = asyncio.Event(), []
    admission = Admission(_gated_app(release, order), limit=1, threads=4, wait_seconds=0.3, queue=2)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        held = asyncio.create_task(_call(admission, "/v1/slow"))
        await asyncio.sleep(0.02)
        waiting = [asyncio.create_task(_call(admission, "/v1/a")) for _ in range(2)]
        await asyncio.sleep(0.02)
        started = loop.time()
        status, headers, body = await _call(admission, "/v1/full")  # the queue is full: at once
        assert (status, json.loads(body)["code"]) == (503, "overloaded")
        assert int(headers[b"retry-after"]) >= 1
        assert loop.time() - started < 0.1
        answers = [await asyncio.wait_for(t, 2) for t in waiting]  # waited 0.3 s, then refused
        assert [(a[0], json.loads(a[2])["code"]) for a in answers] == [(503, "overloaded")] * 2
        assert 0.25 <= loop.time() - started < 1.0
        assert not admission.waiting and admission.in_flight == 1
        release.set()
        assert (await held)[0] == 200
        assert admission.in_flight == 0
        assert order == ["/v1/slow"]  # the refused ones never reached the app

    asyncio.run(scenario())


def test_a_client_gone_while_waiting_leaks_no_slot() -> None:
    release, order = asyncio.Event(), []
    admission = Admission(_gated_app(release, order), limit=1, threads=4, wait_seconds=5, queue=4)

    async def scenario() -> None:
        held = asyncio.create_task(_call(admission, "/v1/slow"))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(_call(admission, "/v1/gone"))
        await asyncio.sleep(0.02)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert not admission.waiting
        release.set()
        await held
        assert admission.in_flight == 0
        assert (await _call(admission, "/v1/next"))[0] == 200
        assert admission.in_flight == 0 and order == ["/v1/slow", "/v1/next"]

    asyncio.run(scenario())


def test_a_slot_left_by_a_long_poll_goes_to_the_oldest_waiter_and_is_passed_on_if_it_is_gone() -> None:
    from starlette.requests import Request

    tasks: dict[str, asyncio.Task[Any]] = {}
    order: list[str] = []
    polling = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/v1/poll":
            polling.set()
            await asyncio.sleep(0.05)
            leave_admission(Request(scope))  # the slot goes to /v1/gone, the oldest waiter ...
            tasks["gone"].cancel()  # ... whose client leaves before it runs: passed on to /v1/next
            await asyncio.sleep(0.05)
        order.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    admission = Admission(app, limit=1, threads=4, wait_seconds=5, queue=4)

    async def scenario() -> None:
        poll = asyncio.create_task(_call(admission, "/v1/poll"))
        await polling.wait()
        tasks["gone"] = asyncio.create_task(_call(admission, "/v1/gone"))
        await asyncio.sleep(0.01)
        following = asyncio.create_task(_call(admission, "/v1/next"))
        assert (await asyncio.wait_for(following, 2))[0] == 200
        assert (await poll)[0] == 200
        with pytest.raises(asyncio.CancelledError):
            await tasks["gone"]
        assert order == ["/v1/next", "/v1/poll"]
        assert admission.in_flight == 0 and not admission.waiting

    asyncio.run(scenario())


def test_a_long_wait_can_leave_admission() -> None:
    from starlette.requests import Request

    waiting = asyncio.Event()

    async def long_poll(scope: Any, receive: Any, send: Any) -> None:
        leave_admission(Request(scope))
        leave_admission(Request(scope))  # twice is harmless
        waiting.set()
        await asyncio.sleep(0.2)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    admission = Admission(long_poll, limit=1, threads=4)

    async def scenario() -> None:
        task = asyncio.create_task(_call(admission, "/v1/wait"))
        await waiting.wait()
        assert admission.in_flight == 0
        assert (await _call(admission, "/v1/other"))[0] == 200
        assert (await task)[0] == 200
        assert admission.in_flight == 0

    asyncio.run(scenario())


def test_pool_smaller_than_its_users_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="could wait for connections while holding every worker thread"):
        Settings(data_dir=tmp_path, worker_threads=32, database_pool_size=10)
    settings = Settings(data_dir=tmp_path, worker_threads=8)
    assert settings.pool_size == settings.database_users == 8 + 2 + 2 + 5
    assert settings.requests_in_flight_limit == 32
    assert settings.requests_waiting_limit == 128 and settings.admission_wait_seconds == 2.0
    # waiting up to the 503's Retry-After never serves a client later than refusing it would
    assert settings.admission_wait_seconds <= RETRY_AFTER_SECONDS
    small = make_engine(f"sqlite:///{tmp_path / 'x.db'}", pool_size=5)
    with pytest.raises(UnsafeConfiguration, match="deadlock"):
        check_pool(small, settings)
    check_pool(make_engine(f"sqlite:///{tmp_path / 'y.db'}", pool_size=settings.pool_size), settings)
    # an engine made without settings (tests, tools) fits the default settings
    check_pool(make_engine(f"sqlite:///{tmp_path / 'z.db'}"), Settings(data_dir=tmp_path))
