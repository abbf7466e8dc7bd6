"""Pooled SSH command execution with paramiko.

- One connection per login name (the POSIX user, or the service account),
  opened on first use, reused by every thread, closed after
  ``pool_idle_seconds`` without use (a reaper thread) or when it breaks.
- The TCP socket is created here with ``TCP_NODELAY`` (without it every command
  costs ~40 ms of Nagle/delayed-ACK stall) and a connect timeout.
- The host key is pinned (``RejectPolicy`` plus the configured key under
  ``host`` or ``[host]:port``); an unknown or different key is refused.
- At most ``max_channels_per_connection`` commands run at once on one
  connection (sshd refuses channels beyond ``MaxSessions``); others wait.
- stdout and stderr are drained together while the command runs (paramiko
  stalls when an unread stream fills its window), up to ``max_output_bytes``;
  or, for an answer with no size bound (:meth:`SSHPool.stream_lines`), read line by
  line as the caller takes them, a line at most ``max_output_bytes``.

Errors are the broker's AdapterError classes. Anything that fails before the
command was sent is :class:`ClusterUnreachable` (or a configuration error for
host key / authentication problems). A failure after sending is
:class:`SubmitOutcomeUnknown` for non-idempotent commands (``sbatch``) and
:class:`ClusterUnreachable` otherwise; such commands are never retried here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import paramiko

from adapters.slurm_ssh.settings import SSHSettings
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterUnreachable,
    OutputTooLarge,
    SubmitOutcomeUnknown,
)

__all__ = ["CommandResult", "SSHPool"]

log = logging.getLogger(__name__)

IdentityProvider = Callable[[str], paramiko.PKey]
#: offered first: with AES-GCM the packet's integrity check runs inside the cipher (C),
#: while with paramiko's default first choice (aes128-ctr + hmac-sha2-256) paramiko builds
#: an HMAC and compares it byte by byte in Python for every packet — a quarter of the
#: client's CPU per command (callgrind, one sbatch: 2.40 -> 1.73 M instructions). Only
#: the order changes: a server without AES-GCM agrees on the next of paramiko's defaults.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_READ_CHUNK = 65536
#: paramiko's exit status when the channel closed without one (the command died of a signal)
NO_EXIT_STATUS = -1


@dataclass(frozen=True)
class CommandResult:
    """What one remote command produced."""

    exit_status: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        """True for exit status 0."""
        return self.exit_status == 0


class _NotSent(Exception):
    """Internal: the command never reached the server (safe to retry)."""


@dataclass
class _Connection:
    login: str
    client: paramiko.SSHClient
    slots: threading.BoundedSemaphore
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def _close_channel(channel: paramiko.Channel) -> None:
    """Close ``channel``; its connection may be gone already (the server dropped it, or
    its transport thread stopped on a socket error while output was still arriving).
    Closing then fails, and that failure must not replace what the command came to —
    its result, or the error that ended it (``OutputTooLarge``, a timeout): seen in CI
    as an ``EOFError`` from ``close()`` in place of ``OutputTooLarge``. A dead
    connection is replaced at its next use (``_Connection.alive``)."""
    try:
        channel.close()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        log.debug("SSH channel close failed (connection gone): %s", exc)


def pinned_keys(settings: SSHSettings) -> list[tuple[str, paramiko.PKey]]:
    """The configured host keys as (type, key); AdapterConfigError if unreadable."""
    keys = []
    for line in settings.host_keys:
        kind, data = line.split()[:2]
        try:
            key = paramiko.PKey.from_type_string(kind, base64.b64decode(data, validate=True))
        except (paramiko.SSHException, ValueError, binascii.Error) as exc:
            raise AdapterConfigError(f"slurm_ssh: host_key {kind} cannot be read: {exc}") from exc
        keys.append((kind, key))
    return keys


def open_socket(settings: SSHSettings) -> socket.socket:
    """A connected TCP socket with TCP_NODELAY; raises OSError."""
    sock = socket.create_connection(
        (settings.host, settings.port), timeout=settings.connect_timeout
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:…`` fingerprint of a public key (what ``ssh-keygen -lf`` prints)."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def offered(key: paramiko.PKey) -> str:
    """The key a server offered, as a sysadmin compares it with the pinned one."""
    return f"{key.get_name()} {fingerprint(key)} ({key.get_name()} {key.get_base64()})"


class OfferedKeyRejected(paramiko.SSHException):
    """The server offered a host key that is not pinned (carries the key)."""

    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__(f"host key {key.get_name()} {fingerprint(key)} is not pinned")
        self.key = key


class _RejectUnpinned(paramiko.MissingHostKeyPolicy):
    """Like paramiko's RejectPolicy, but the error carries the offered key."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise OfferedKeyRejected(key)


def client_transport(sock: Any, /, **kwargs: Any) -> paramiko.Transport:
    """paramiko's transport with :data:`PREFERRED_CIPHERS` offered first (``SSHClient.connect``'s
    ``transport_factory``: it passes the socket and paramiko's keyword options)."""
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    known = options.ciphers
    options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in known) + tuple(
        c for c in known if c not in PREFERRED_CIPHERS)
    return transport


def ssh_login(
    settings: SSHSettings, sock: socket.socket, login: str, pkey: paramiko.PKey
) -> paramiko.SSHClient:
    """An authenticated SSHClient over ``sock``; paramiko exceptions propagate."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_RejectUnpinned())
    for kind, key in pinned_keys(settings):
        client.get_host_keys().add(settings.host_key_entry, kind, key)
    try:
        client.connect(
            settings.host,
            port=settings.port,
            username=login,
            pkey=pkey,
            sock=sock,
            timeout=settings.connect_timeout,
            banner_timeout=settings.connect_timeout,
            auth_timeout=settings.connect_timeout,
            channel_timeout=settings.connect_timeout,
            allow_agent=False,
            look_for_keys=False,
            transport_factory=client_transport,
        )
    except BaseException:
        client.close()
        raise
    return client


def _connect_error(settings: SSHSettings, login: str, exc: BaseException) -> AdapterError:
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, paramiko.BadHostKeyException | OfferedKeyRejected):
        return AdapterConfigError(
            f"host key of {where} does not match the pinned key: the server offered {offered(exc.key)}",
            code="host_key_mismatch",
        )
    if isinstance(exc, paramiko.AuthenticationException):
        return AdapterConfigError(
            f"SSH login as {login} refused by {where}", code="ssh_auth_failed"
        )
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        return AdapterConfigError(
            f"host key of {where} is not the pinned one", code="host_key_mismatch"
        )
    if isinstance(exc, AdapterError):
        return exc
    return ClusterUnreachable(f"cannot reach {where}: {exc}", code="cluster_unavailable")


class SSHPool:
    """Thread-safe pool of authenticated connections, one per login name."""

    def __init__(self, settings: SSHSettings, identity: IdentityProvider) -> None:
        self._settings = settings
        self._identity = identity
        self._lock = threading.Lock()
        self._conns: dict[str, _Connection] = {}
        self._login_locks: dict[str, threading.Lock] = {}
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None

    # ------------------------------------------------------------------ public

    def run(
        self,
        username: str,
        command: str,
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        idempotent: bool = True,
    ) -> CommandResult:
        """Run ``command`` for ``username`` (its login per the settings).

        A stale pooled connection is replaced and the command retried once, as
        long as nothing was sent yet.
        """
        login = self._settings.login_for(username)
        for attempt in (1, 2):
            conn = self._acquire(login)
            try:
                return self._exec(conn, command, stdin, timeout, idempotent)
            except _NotSent as exc:
                self._discard(conn)
                if attempt == 2:
                    raise ClusterUnreachable(f"SSH channel to {self._where} failed: {exc}") from exc
            finally:
                self._release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def stream_lines(self, username: str, command: str, *, failure: Callable[[int, str], AdapterError],
                     stderr_bytes: int = 65536) -> Generator[str, None, None]:
        """Run a read-only ``command`` for ``username`` and yield its stdout line by
        line (without the newline) as the caller takes them: the output has no size
        cap, one line has ``max_output_bytes`` (past it ``OutputTooLarge``), and the
        pending output is what one SSH window holds (the remote command waits while
        the caller works). ``command_timeout`` bounds each wait for more output, not
        the whole command. A non-zero exit raises ``failure(exit status, the first
        stderr_bytes of stderr)``, after the lines; closing the generator early closes
        the channel (the remote command gets SIGPIPE)."""
        login = self._settings.login_for(username)
        limit = self._settings.command_timeout
        for attempt in (1, 2):
            conn = self._acquire(login)
            try:
                if not conn.slots.acquire(timeout=limit):
                    raise ClusterUnreachable(f"no free SSH channel to {self._where}", code="ssh_busy")
                try:
                    try:
                        channel = self._open_channel(conn)
                    except _NotSent as exc:
                        self._discard(conn)
                        if attempt == 2:
                            raise ClusterUnreachable(f"SSH channel to {self._where} failed: {exc}") from exc
                        continue
                    try:
                        yield from self._stream(channel, command, limit, stderr_bytes, failure)
                        return
                    finally:
                        _close_channel(channel)
                finally:
                    conn.slots.release()
            finally:
                self._release(conn)

    def _stream(self, channel: paramiko.Channel, command: str, limit: float, stderr_bytes: int,
                failure: Callable[[int, str], AdapterError]) -> Iterator[str]:
        cap = self._settings.max_output_bytes
        try:
            channel.settimeout(limit)
            channel.exec_command(command)
            channel.setblocking(False)
            out, err = bytearray(), bytearray()
            out_open = err_open = True
            with selectors.DefaultSelector() as sel:
                sel.register(channel.fileno(), selectors.EVENT_READ)
                deadline = time.monotonic() + limit
                while out_open or err_open:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no output for {limit} s")
                    sel.select(min(remaining, 1.0))
                    size = len(out) + len(err)
                    out_open = _read_some(channel.recv, out, out_open)
                    err_open = _read_some(channel.recv_stderr, err, err_open)
                    if len(out) + len(err) > size:
                        deadline = time.monotonic() + limit
                    del err[stderr_bytes:]
                    end = out.rfind(b"\n")
                    if end >= 0:
                        lines = bytes(out[:end]).decode("utf-8", "replace").split("\n")
                        del out[:end + 1]
                        yield from lines
                    if len(out) > cap:
                        raise OutputTooLarge(f"an output line exceeds max_output_bytes ({cap})")
            if out:
                yield out.decode("utf-8", "replace")
            status = self._exit_status(channel, time.monotonic() + limit)
        except (paramiko.SSHException, OSError, EOFError, TimeoutError) as exc:
            raise self._after_send(exc, True, "stream") from exc
        if status != 0:
            raise failure(status, err.decode("utf-8", "replace"))

    def close(self) -> None:
        """Close every connection and stop the reaper."""
        self._closed.set()
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for conn in conns:
            conn.close()

    def probe(self, login: str | None, command: str) -> Probe:
        """Step by step on a fresh connection, never raising: TCP connect, host
        key, authentication (as ``login``), then ``command``. Without a login
        only TCP and the host key are checked."""
        probe = Probe()
        try:
            sock = open_socket(self._settings)
        except OSError as exc:
            probe.checks["tcp_connect"] = f"failed: {describe(exc)}"
            return probe
        probe.checks["tcp_connect"] = "ok"
        if login is None:
            probe.checks["host_key"] = check_host_key(self._settings, sock)
            return probe
        try:
            client = ssh_login(self._settings, sock, login, self._identity(login))
        except paramiko.AuthenticationException as exc:
            probe.checks["host_key"] = "ok"
            probe.checks["auth"] = f"refused for {login}: {describe(exc)}"
            return probe
        except (paramiko.SSHException, OSError, EOFError, AdapterError) as exc:
            sock.close()
            err = _connect_error(self._settings, login, exc)
            probe.checks["host_key" if err.code == "host_key_mismatch" else "ssh"] = describe(err)
            return probe
        probe.checks["host_key"] = "ok"
        probe.checks["auth"] = "ok"
        conn = _Connection(login=login, client=client, slots=threading.BoundedSemaphore(1))
        try:
            probe.result = self._exec(conn, command, None, None, True)
            probe.checks["command"] = (
                "ok"
                if probe.result.ok
                else (f"exit {probe.result.exit_status}: {probe.result.stderr.strip()[:200]}")
            )
        except AdapterError as exc:
            probe.checks["command"] = describe(exc)
        finally:
            conn.close()
        return probe

    def connection_count(self) -> int:
        """How many connections are open (tests, metrics)."""
        with self._lock:
            return len(self._conns)

    # ---------------------------------------------------------------- plumbing

    @property
    def _where(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    def _acquire(self, login: str) -> _Connection:
        with self._lock:
            lock = self._login_locks.setdefault(login, threading.Lock())
        with lock:
            with self._lock:
                conn = self._conns.get(login)
            if conn is None or not conn.alive():
                if conn is not None:
                    self._discard(conn)
                conn = self._open(login)
                with self._lock:
                    self._conns[login] = conn
                self._start_reaper()
            with self._lock:
                conn.busy += 1
        return conn

    def _release(self, conn: _Connection) -> None:
        with self._lock:
            conn.busy -= 1
            conn.last_used = time.monotonic()

    def _discard(self, conn: _Connection) -> None:
        with self._lock:
            if self._conns.get(conn.login) is conn:
                del self._conns[conn.login]
        conn.close()

    def _open(self, login: str) -> _Connection:
        started = time.monotonic()
        try:
            pkey = self._identity(login)
            sock = open_socket(self._settings)
        except OSError as exc:
            raise ClusterUnreachable(f"cannot connect to {self._where}: {exc}") from exc
        try:
            client = ssh_login(self._settings, sock, login, pkey)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            sock.close()
            raise _connect_error(self._settings, login, exc) from exc
        transport = client.get_transport()
        if transport is not None and self._settings.keepalive_seconds:
            transport.set_keepalive(self._settings.keepalive_seconds)
        log.debug(
            "ssh connection to %s as %s in %.1f ms",
            self._where,
            login,
            (time.monotonic() - started) * 1000,
        )
        slots = threading.BoundedSemaphore(self._settings.max_channels_per_connection)
        return _Connection(login=login, client=client, slots=slots)

    def _start_reaper(self) -> None:
        if self._reaper is not None or self._settings.pool_idle_seconds <= 0:
            return
        self._reaper = threading.Thread(
            target=self._reap_loop, name="slurm-ssh-reaper", daemon=True
        )
        self._reaper.start()

    def _reap_loop(self) -> None:
        interval = max(0.5, min(self._settings.pool_idle_seconds / 2, 15.0))
        while not self._closed.wait(interval):
            self.reap_idle()

    def reap_idle(self) -> int:
        """Close connections idle for longer than ``pool_idle_seconds``."""
        limit = time.monotonic() - self._settings.pool_idle_seconds
        with self._lock:
            idle = [c for c in self._conns.values() if c.busy == 0 and c.last_used < limit]
            for conn in idle:
                del self._conns[conn.login]
        for conn in idle:
            conn.close()
        return len(idle)

    # -------------------------------------------------------------------- exec

    def _exec(
        self,
        conn: _Connection,
        command: str,
        stdin: bytes | None,
        timeout: float | None,
        idempotent: bool,
    ) -> CommandResult:
        limit = self._settings.command_timeout if timeout is None else timeout
        started = time.monotonic()
        if not conn.slots.acquire(timeout=limit):
            raise ClusterUnreachable(f"no free SSH channel to {self._where}", code="ssh_busy")
        try:
            channel = self._open_channel(conn)
            try:
                return self._drive(channel, command, stdin, started, limit, idempotent)
            finally:
                _close_channel(channel)
        finally:
            conn.slots.release()

    def _open_channel(self, conn: _Connection) -> paramiko.Channel:
        transport = conn.client.get_transport()
        if transport is None or not transport.is_active():
            raise _NotSent("connection closed")
        try:
            return transport.open_session(timeout=self._settings.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise _NotSent(str(exc)) from exc

    def _drive(
        self,
        channel: paramiko.Channel,
        command: str,
        stdin: bytes | None,
        started: float,
        limit: float,
        idempotent: bool,
    ) -> CommandResult:
        deadline = started + limit
        try:
            channel.settimeout(max(0.1, deadline - time.monotonic()))
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._after_send(exc, idempotent, "exec") from exc
        try:
            if stdin is not None:
                channel.sendall(stdin)
                channel.shutdown_write()
            # Without stdin no EOF is sent at all (the commands read none; sshd ends the
            # session when the command exits). An EOF sent after a fast command had already
            # ended races paramiko's reply to the server's CLOSE: when it arrives second,
            # OpenSSH drops the whole connection ("ieof packet referred to nonexistent
            # channel") and every command in flight on it — seen under load in CI.
            out, err = self._drain(channel, deadline)
            status = self._exit_status(channel, deadline)
        except (paramiko.SSHException, OSError, EOFError, TimeoutError) as exc:
            raise self._after_send(exc, idempotent, "run") from exc
        return CommandResult(
            exit_status=status,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            seconds=time.monotonic() - started,
        )

    def _after_send(self, exc: BaseException, idempotent: bool, step: str) -> AdapterError:
        detail = (
            f"SSH command on {self._where} did not complete ({step}): {exc or type(exc).__name__}"
        )
        if idempotent:
            return ClusterUnreachable(detail, code="command_timeout")
        return SubmitOutcomeUnknown(detail)

    def _drain(self, channel: paramiko.Channel, deadline: float) -> tuple[bytes, bytes]:
        out, err = bytearray(), bytearray()
        out_open = err_open = True
        cap = self._settings.max_output_bytes
        channel.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(channel.fileno(), selectors.EVENT_READ)
            while out_open or err_open:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("command timed out")
                sel.select(min(remaining, 1.0))
                out_open = _read_some(channel.recv, out, out_open)
                err_open = _read_some(channel.recv_stderr, err, err_open)
                if len(out) + len(err) > cap:
                    raise OutputTooLarge(f"command output exceeds max_output_bytes ({cap})")
        return bytes(out), bytes(err)

    @staticmethod
    def _exit_status(channel: paramiko.Channel, deadline: float) -> int:
        """The command's exit status; :data:`NO_EXIT_STATUS` when the channel closed
        without one (the command died of a signal: sshd sends ``exit-signal``)."""
        if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("no exit status")
        return int(channel.exit_status)


def _read_some(recv: Callable[[int], bytes], buf: bytearray, is_open: bool) -> bool:
    """Read what is available; returns False once the stream reached EOF."""
    if not is_open:
        return False
    while True:
        try:
            data = recv(_READ_CHUNK)
        except TimeoutError:
            return True
        if not data:
            return False
        buf.extend(data)


def describe(exc: BaseException) -> str:
    """Short text for an exception, without secrets (used in health details)."""
    text: Any = str(exc) or type(exc).__name__
    return str(text)[:300]


@dataclass
class Probe:
    """Which connection steps worked (``checks``: step → ``"ok"`` or the failure)."""

    checks: dict[str, str] = field(default_factory=dict)
    result: CommandResult | None = None

    @property
    def failed(self) -> str | None:
        """The first failed step and its reason, or None."""
        for step, outcome in self.checks.items():
            if outcome != "ok":
                return f"{step}: {outcome}"
        return None


def check_host_key(settings: SSHSettings, sock: socket.socket) -> str:
    """Handshake only (no login) and compare the server's key with the pinned
    ones; returns ``"ok"`` or the reason."""
    transport = paramiko.Transport(sock)
    try:
        pinned = pinned_keys(settings)
        options = transport.get_security_options()
        kinds = [k for k, _ in pinned]
        options.key_types = kinds + [k for k in options.key_types if k not in kinds]
        transport.start_client(timeout=settings.connect_timeout)
        server_key = transport.get_remote_server_key()
        if any(server_key == key for _, key in pinned):
            return "ok"
        return f"the server offered {offered(server_key)}, which is not the pinned key"
    except (paramiko.SSHException, OSError, EOFError) as exc:
        return f"failed: {describe(exc)}"
    finally:
        transport.close()
