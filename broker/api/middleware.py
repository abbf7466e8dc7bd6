"""ASGI middleware: admission control (beyond the requests in flight a process
takes, a short bounded wait, then 503 ``overloaded``), ETag / If-None-Match on
reads, body-size cap (413 from Content-Length before reading, and while counting a
chunked body), and the URL check (no control characters in path or query)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote_to_bytes

from anyio import to_thread
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.config import STREAM_THREADS
from broker.metrics import REQUESTS_SHED

#: answered whatever the load: they take no worker thread (see broker/api/app.py)
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER_SECONDS = 2


class Admission:
    """At most ``limit`` requests of this process in flight (running or waiting for a
    worker thread). One more waits for a slot — first come, first served — at most
    ``wait_seconds``, and at most ``queue`` requests wait at once; past either bound
    the answer is 503 ``overloaded`` with ``Retry-After`` (never a 30 s wait). A burst
    of cheap reads a little beyond the limit is served a few hundred milliseconds
    later instead of refused; a real overload is still refused within ``wait_seconds``,
    and the waiting costs a future and a timer each (bounded by ``queue``).
    ``wait_seconds=0`` or ``queue=0``: refused at once. Probes are not counted.

    It also sets the event loop's worker-thread limit to ``threads`` and bounds its
    default executor to ``STREAM_THREADS`` (the numbers the database pool is sized
    for, broker/config.py) before the first request runs.

    A handler that waits a long time without using a worker thread or the database
    (a long poll, an event stream) calls :func:`leave_admission` so it stops
    counting against the limit."""

    def __init__(self, app: ASGIApp, *, limit: int, threads: int, wait_seconds: float = 0.0, queue: int = 0,
                 exempt: Iterable[str] = PROBES) -> None:
        self.app = app
        self.limit = limit
        self.threads = threads
        self.wait_seconds = wait_seconds
        self.queue = queue if wait_seconds > 0 else 0
        self.exempt = frozenset(exempt)
        self.in_flight = 0
        #: requests waiting for a slot, oldest first (a slot is handed to the oldest)
        self.waiting: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # thread limits belong to one event loop
            to_thread.current_default_thread_limiter().total_tokens = self.threads
            # asyncio.to_thread (the short reads of long polls and streams) uses this one
            loop.set_default_executor(ThreadPoolExecutor(STREAM_THREADS, thread_name_prefix="aifa-stream"))
            self._loop = loop
        if scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if not await self._admit(loop):
            REQUESTS_SHED.inc()
            await _problem(send, 503, "overloaded",
                           f"The broker is at its limit of {self.limit} requests in flight; try again shortly.",
                           headers=[(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])
            return
        counted = [True]

        def leave() -> None:
            if counted[0]:
                counted[0] = False
                self._release()

        scope.setdefault("state", {})["leave_admission"] = leave
        try:
            await self.app(scope, receive, send)
        finally:
            leave()

    async def _admit(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Take a slot: at once if one is free and nobody waits, else by waiting (bounded)."""
        if self.in_flight < self.limit and not self.waiting:
            self.in_flight += 1
            return True
        if len(self.waiting) >= self.queue:
            return False
        slot: asyncio.Future[bool] = loop.create_future()
        self.waiting.append(slot)
        timer = loop.call_later(self.wait_seconds, self._expire, slot)
        try:
            return await slot
        except asyncio.CancelledError:  # the client went away while waiting
            if slot.done() and not slot.cancelled() and slot.result():
                self._release()  # it had just been handed a slot: pass it on
            with contextlib.suppress(ValueError):
                self.waiting.remove(slot)
            raise
        finally:
            timer.cancel()

    def _expire(self, slot: asyncio.Future[bool]) -> None:
        if not slot.done():
            self.waiting.remove(slot)
            slot.set_result(False)

    def _release(self) -> None:
        """A request leaves: its slot goes to the oldest waiting request, if any."""
        while self.waiting:
            slot = self.waiting.popleft()
            if not slot.done():
                slot.set_result(True)
                return
        self.in_flight -= 1


def leave_admission(request: Request) -> None:
    """Stop counting this request against the in-flight limit (call it before a long
    wait that holds no worker thread and no database connection)."""
    leave = request.scope.get("state", {}).get("leave_admission")
    if leave is not None:
        leave()


class ETag:
    """A strong ``ETag`` (hash of the body) on successful JSON answers to ``GET`` under
    ``prefix``, and 304 Not Modified when ``If-None-Match`` names it: a client
    polling a job it already has gets a few bytes back."""

    def __init__(self, app: ASGIApp, *, prefix: str = "/v1/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in {"GET", "HEAD"} \
                or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        if_none_match = dict(scope.get("headers", [])).get(b"if-none-match", b"").decode("latin-1")
        start: Message | None = None
        chunks: list[bytes] = []
        passthrough = False

        async def buffering_send(message: Message) -> None:
            nonlocal start, passthrough
            if passthrough:
                await send(message)
                return
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] != 200 or not content_type.startswith(b"application/json"):
                    passthrough = True
                    await send(message)
                    return
                start = message
                return
            if message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(chunks)
                tag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"etag"]
                headers.append((b"etag", tag.encode()))
                if _matches(if_none_match, tag):
                    headers = [(k, v) for k, v in headers if k not in {b"content-length", b"content-type"}]
                    await send({"type": "http.response.start", "status": 304, "headers": headers})
                    await send({"type": "http.response.body", "body": b""})
                    return
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, buffering_send)


def _matches(if_none_match: str, tag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {c.strip().removeprefix("W/") for c in if_none_match.split(",")}
    return "*" in candidates or tag in candidates


class BodyLimit:
    """Refuse bodies over ``max_bytes``: by ``Content-Length`` up front, and by
    counting for chunked uploads, so a 10 MB body is never read into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                await _problem(send, 400, "bad_request", "Content-Length is not a number.")
                return
            if too_big:
                await _problem(send, 413, "payload_too_large",
                               f"The request body is larger than {self.max_bytes} bytes.")
                return
        received = 0
        started = over = False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's own answer to the aborted read (a 400) is replaced below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counting_receive, tracking_send)
        if over and not started:
            await _problem(send, 413, "payload_too_large",
                           f"The request body is larger than {self.max_bytes} bytes.")


# C0 controls and DEL; a URL is text for people and databases (PostgreSQL refuses NUL)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class UrlCheck:
    """Refuse a path or query string that decodes to control characters (``%00`` …):
    422 ``validation_error`` before any route sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape")
            query = scope.get("query_string", b"")
            for where, raw in (("path", raw_path), ("query", query.replace(b"+", b" "))):
                decoded = unquote_to_bytes(raw)
                if _CONTROL.search(decoded):
                    await _problem(send, 422, "validation_error",
                                   f"The URL {where} contains control characters.")
                    return
                try:
                    decoded.decode("utf-8")
                except UnicodeDecodeError:
                    await _problem(send, 422, "validation_error", f"The URL {where} is not valid UTF-8.")
                    return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _problem(send: Send, status: int, code: str, detail: str,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body: dict[str, Any] = {"type": f"https://aifa-broker.eu/problems/{code}", "title": code,
                            "status": status, "code": code, "detail": detail}
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/problem+json"),
                            (b"content-length", str(len(raw)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": raw})
