"""Every accepted API connection has TCP_NODELAY, also on a listening socket bound the
way uvicorn binds it for several workers (``socket.socket(AF_INET)``, proto 0), where
asyncio itself leaves Nagle's algorithm on (40 ms per answer written in two pieces)."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from uvicorn.server import ServerState

from broker.server import NoDelayHTTPProtocol


async def _app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _nodelay(sock: object) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # type: ignore[attr-defined]


async def _serve_one_request(protocol_factory_cls: type) -> tuple[int, bytes]:
    """Serve one keep-alive request on a proto-0 listening socket; the server side's
    TCP_NODELAY (read while the connection is still open) and the answer."""
    config = uvicorn.Config(_app, log_level="warning", lifespan="off")
    config.load()
    state = ServerState()
    made: list[asyncio.Protocol] = []

    def factory() -> asyncio.Protocol:
        proto = protocol_factory_cls(config=config, server_state=state, app_state={})
        made.append(proto)
        return proto

    listener = socket.socket(socket.AF_INET)  # as uvicorn's Config.bind_socket: proto 0
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = await asyncio.get_running_loop().create_server(factory, sock=listener)
    try:
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"ok"), 10)
        flag = _nodelay(made[0].transport.get_extra_info("socket"))  # type: ignore[attr-defined]
        writer.close()
        await writer.wait_closed()
        return flag, answer
    finally:
        server.close()


def test_the_broker_protocol_turns_nagle_off_on_a_proto_zero_listener() -> None:
    flag, answer = asyncio.run(_serve_one_request(NoDelayHTTPProtocol))
    assert answer.startswith(b"HTTP/1.1 200")
    assert flag != 0


def test_without_it_asyncio_leaves_nagle_on_there() -> None:
    """The premise of the fix (if a future Python sets it itself, this test says the
    class may go; the one above still holds)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    flag, answer = asyncio.run(_serve_one_request(AutoHTTPProtocol))
    assert answer.startswith(b"HTTP/1.1 200")
    assert flag == 0
