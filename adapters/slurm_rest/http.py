"""HTTP/1.1 keep-alive to one slurmrestd over the standard library's ``http.client``.

An ``httpx`` transport (the client keeps httpx's request/response types and
exception classes, and unit tests still swap in ``httpx.MockTransport``), without
httpcore's connection machinery: per call that cost ~2.5× the CPU of
``http.client`` (h11 state machine, a pool pass polling every idle connection
twice per call), and every submission pays it.

- Idle connections are kept (last used, first reused) up to ``max_idle``; any
  number may be in use at once, one call each.
- Before reuse an idle connection's socket is polled: readable means the server
  closed it (or sent something unasked), so it is dropped, not written to — a
  submit is never sent on a connection the server has given up.
- Failures are httpx's classes, so the caller's rules apply unchanged: connecting
  (refused, timed out, TLS handshake) → ``ConnectError``/``ConnectTimeout`` (nothing
  was sent); writing → ``WriteError``/``WriteTimeout``; the answer →
  ``RemoteProtocolError`` (closed without one), ``ReadTimeout``, ``ReadError``.
  The original error is the ``__cause__`` (TLS failures are recognised by it).
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx

_CHUNK = 65536


class StdlibTransport(httpx.BaseTransport):
    """Pooled ``http.client`` connections to the origin of ``url``."""

    def __init__(self, url: str, *, timeout: float, connect_timeout: float, max_idle: int = 32) -> None:
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._context = httpx.create_ssl_context(trust_env=False) if self._https else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ pool

    def _checkout(self) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if _usable(conn):
                return conn
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._connect_timeout,
                                               context=self._context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout)
        try:
            conn.connect()
        except TimeoutError as exc:
            conn.close()
            raise httpx.ConnectTimeout(f"connect to {self._host}:{self._port} timed out") from exc
        except OSError as exc:  # refused, unreachable, TLS handshake (ssl.SSLError)
            conn.close()
            raise httpx.ConnectError(f"{exc}") from exc
        assert conn.sock is not None
        conn.sock.settimeout(self._timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections; those in use close when their call ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------------ calls

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; the answer's body is streamed (closing it frees the connection)."""
        conn = self._checkout()
        target = request.url.raw_path.decode("ascii")
        try:
            conn.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers.raw:
                conn.putheader(name.decode("latin-1"), value.decode("latin-1"))
            conn.endheaders(request.read() or None)
        except TimeoutError as exc:
            conn.close()
            raise httpx.WriteTimeout(f"sending to {self._host}:{self._port} timed out") from exc
        except OSError as exc:
            conn.close()
            raise httpx.WriteError(f"{exc}") from exc
        try:
            answer = conn.getresponse()
        except Exception as exc:
            conn.close()
            raise _read_failure(exc) from exc
        return httpx.Response(answer.status, headers=answer.getheaders(), stream=_Body(self, conn, answer))


class _Body(httpx.SyncByteStream):
    """An answer's body; its connection goes back to the pool once it was read whole."""

    def __init__(self, pool: StdlibTransport, conn: http.client.HTTPConnection,
                 answer: http.client.HTTPResponse) -> None:
        self._pool, self._conn, self._answer = pool, conn, answer
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            while chunk := self._answer.read(_CHUNK):
                yield chunk
        except Exception as exc:
            self._conn.close()
            raise _read_failure(exc) from exc

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        if self._answer.isclosed() and not self._answer.will_close:
            self._pool._checkin(self._conn)  # read whole and keep-alive: reusable
        else:
            self._conn.close()


def _usable(conn: http.client.HTTPConnection) -> bool:
    """An idle connection can take a request: its socket is open and has nothing to
    read (readable while idle = the server closed it)."""
    sock = conn.sock
    if sock is None or sock.fileno() < 0:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)


def _read_failure(exc: BaseException) -> httpx.TransportError:
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout("no answer in time")
    if isinstance(exc, http.client.RemoteDisconnected | http.client.IncompleteRead | http.client.HTTPException):
        return httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ssl.SSLError | OSError):
        return httpx.ReadError(f"{exc}")
    return httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}")
