"""ASGI middleware: body-size cap (413 from Content-Length before reading, and while
counting a chunked body), and the URL check (no control characters in path or query)."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send


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


async def _problem(send: Send, status: int, code: str, detail: str) -> None:
    body: dict[str, Any] = {"type": f"https://aifa-broker.eu/problems/{code}", "title": code,
                            "status": status, "code": code, "detail": detail}
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/problem+json"),
                            (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})
