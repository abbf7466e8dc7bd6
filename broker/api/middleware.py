"""ASGI middleware: body-size cap (413 from Content-Length before reading)."""

from __future__ import annotations

import json
from typing import Any

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
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _problem(send, 413, "payload_too_large",
                               f"The request body is larger than {self.max_bytes} bytes.")


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
