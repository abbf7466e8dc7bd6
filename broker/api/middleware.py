"""ASGI middleware, one layer (:class:`Gate`): admission control (beyond the requests
in flight a process takes, a short bounded wait, then 503 ``overloaded``), ETag /
If-None-Match on reads, body-size cap (413 from Content-Length before reading, and
while counting a chunked body), and the URL check (no control characters in path or
query)."""

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
        if await self.refused(scope, send):
            return
        if scope["path"] in self.exempt:
            await self.forward(scope, receive, send)
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
            await self.forward(scope, receive, send)
        finally:
            leave()

    async def refused(self, scope: Scope, send: Send) -> bool:
        """Answer a request refused before admission (a subclass's checks); True if so."""
        return False

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an admitted (or exempt) request on to the app."""
        await self.app(scope, receive, send)

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


class Gate(Admission):
    """The API's one ASGI middleware: :class:`Admission`, and before it the URL check
    (a path or query string that decodes to control characters — ``%00`` … — or to
    invalid UTF-8: 422 ``validation_error`` before any route sees it) and the body-size
    cap (413 ``payload_too_large`` from ``Content-Length`` before reading, and while
    counting a chunked body, so a 10 MB body is never read into memory); after it,
    ``ETag`` / ``If-None-Match`` on successful JSON answers to ``GET`` under
    ``etag_prefix`` (a strong tag, a hash of the body; 304 Not Modified when the client
    names it: a client polling a job it already has gets a few bytes back).

    One layer rather than four: each ASGI layer costs every request a call, and each
    that wraps ``send`` a call per message (measured: ~0.12 M of a GET's ~2 M
    instructions for this project's middlewares as four layers)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, limit: int, threads: int, wait_seconds: float = 0.0,
                 queue: int = 0, etag_prefix: str = "/v1/") -> None:
        super().__init__(app, limit=limit, threads=threads, wait_seconds=wait_seconds, queue=queue)
        self.max_body_bytes = max_body_bytes
        self.etag_prefix = etag_prefix

    async def refused(self, scope: Scope, send: Send) -> bool:
        problem = _url_problem(scope)
        if problem is None:
            length = transfer = None
            for name, value in scope.get("headers", ()):
                if name == b"content-length":
                    length = value
                elif name == b"transfer-encoding":
                    transfer = value
            scope["aifa_chunked"] = transfer is not None
            if length is not None:
                problem = self._length_problem(length)
        if problem is None:
            return False
        await _problem(send, *problem)
        return True

    def _length_problem(self, length: bytes) -> tuple[int, str, str] | None:
        try:
            too_big = int(length) > self.max_body_bytes
        except ValueError:
            return 400, "bad_request", "Content-Length is not a number."
        if too_big:
            return 413, "payload_too_large", f"The request body is larger than {self.max_body_bytes} bytes."
        return None

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in {"GET", "HEAD"} and scope["path"].startswith(self.etag_prefix):
            send = _tagging_send(send, _header(scope, b"if-none-match").decode("latin-1"))
        if not scope.get("aifa_chunked"):
            # a body of a known length was checked against the cap; uvicorn delivers no
            # more than Content-Length says
            await self.app(scope, receive, send)
            return
        await _counting(self.app, self.max_body_bytes, scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return b""


def _tagging_send(send: Send, if_none_match: str) -> Send:
    """``send`` with a strong ETag on a 200 JSON answer, and 304 when ``if_none_match`` names it."""
    start: Message | None = None
    chunks: list[bytes] = []
    passthrough = False

    async def tagging_send(message: Message) -> None:
        nonlocal start, passthrough
        if passthrough:
            await send(message)
            return
        if message["type"] == "http.response.start":
            content_type = b""
            for key, value in message.get("headers", ()):
                if key == b"content-type":
                    content_type = value
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

    return tagging_send


def _matches(if_none_match: str, tag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {c.strip().removeprefix("W/") for c in if_none_match.split(",")}
    return "*" in candidates or tag in candidates


async def _counting(app: ASGIApp, max_bytes: int, scope: Scope, receive: Receive, send: Send) -> None:
    """Run ``app`` on a body of unknown length, answering 413 once it passes ``max_bytes``."""
    received = 0
    started = over = False

    async def counting_receive() -> Message:
        nonlocal received, over
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
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
        await app(scope, counting_receive, tracking_send)
    if over and not started:
        await _problem(send, 413, "payload_too_large", f"The request body is larger than {max_bytes} bytes.")


# C0 controls and DEL; a URL is text for people and databases (PostgreSQL refuses NUL)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _url_problem(scope: Scope) -> tuple[int, str, str] | None:
    """A path or query string that decodes to control characters or invalid UTF-8."""
    raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape")
    query = scope.get("query_string", b"")
    for where, raw in (("path", raw_path), ("query", query.replace(b"+", b" "))):
        decoded = unquote_to_bytes(raw)
        if _CONTROL.search(decoded):
            return 422, "validation_error", f"The URL {where} contains control characters."
        try:
            decoded.decode("utf-8")
        except UnicodeDecodeError:
            return 422, "validation_error", f"The URL {where} is not valid UTF-8."
    return None


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
