"""The SSH transport's channel handling, on a stand-in channel (no network)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import paramiko
import pytest

from adapters.slurm_ssh.settings import SSHSettings
from adapters.slurm_ssh.transport import PREFERRED_CIPHERS, SSHPool, client_transport
from broker.adapter import OutputTooLarge
from tests.unit.adapters.test_slurm_ssh_adapter import HOST_KEY


class RecordingChannel:
    """Records what the transport does to a channel; the command has exited already."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.status_event = threading.Event()
        self.status_event.set()
        self.exit_status = 0

    def settimeout(self, _t: float) -> None:
        pass

    def setblocking(self, _b: bool) -> None:
        pass

    def exec_command(self, command: str) -> None:
        self.steps.append(f"exec {command}")

    def sendall(self, data: bytes) -> None:
        self.steps.append(f"send {len(data)}")

    def shutdown_write(self) -> None:
        self.steps.append("eof")

    def fileno(self) -> int:
        return self._r

    def recv(self, _n: int) -> bytes:
        return b""

    def recv_stderr(self, _n: int) -> bytes:
        return b""

    def __enter__(self) -> RecordingChannel:
        import os
        self._r, self._w = os.pipe()
        os.write(self._w, b"x")  # readable: the transport's select returns at once
        return self

    def __exit__(self, *_: Any) -> None:
        import os
        os.close(self._r)
        os.close(self._w)


def _pool() -> SSHPool:
    settings = SSHSettings.from_mapping({"host": "login.example", "host_key": HOST_KEY,
                                         "ssh_ca_key_file": "/nonexistent/ca"})
    return SSHPool(settings, identity=lambda _login: None)  # type: ignore[arg-type,return-value]


def test_a_command_without_stdin_gets_no_eof() -> None:
    """CI under load: an EOF sent after a fast command (scancel) had ended raced the
    reply to the server's CLOSE; OpenSSH then dropped the connection and every command
    in flight on it. A command without stdin never gets an EOF."""
    with RecordingChannel() as channel:
        result = _pool()._drive(channel, "scancel 5", None, time.monotonic(), 60.0, True)  # type: ignore[arg-type]
    assert channel.steps == ["exec scancel 5"] and result.exit_status == 0


def test_a_command_with_stdin_gets_it_then_eof() -> None:
    with RecordingChannel() as channel:
        _pool()._drive(channel, "sbatch", b"#!/bin/sh\n", time.monotonic(), 60.0, False)  # type: ignore[arg-type]
    assert channel.steps == ["exec sbatch", "send 10", "eof"]
    with RecordingChannel() as channel:  # an empty stdin is still ended
        _pool()._drive(channel, "cat", b"", time.monotonic(), 60.0, False)  # type: ignore[arg-type]
    assert channel.steps == ["exec cat", "send 0", "eof"]


def test_aes_gcm_is_offered_first_and_nothing_is_dropped() -> None:
    """The order of the offer changes, not its content: a server without AES-GCM still
    finds paramiko's other ciphers."""
    mine, theirs = socket.socketpair()
    try:
        transport = client_transport(mine)
        default = paramiko.Transport(theirs).get_security_options().ciphers
        offered = transport.get_security_options().ciphers
        assert offered[: len(PREFERRED_CIPHERS)] == PREFERRED_CIPHERS
        assert sorted(offered) == sorted(default)
    finally:
        mine.close()
        theirs.close()


class DroppedChannel(RecordingChannel):
    """A channel whose connection is gone by the time it is closed (close raises, as
    paramiko's does once its transport's socket is closed); ``output`` bytes arrive first."""

    def __init__(self, output: bytes = b"") -> None:
        super().__init__()
        self._output = output

    def recv(self, n: int) -> bytes:
        chunk, self._output = self._output[:n], self._output[n:]
        return chunk

    def close(self) -> None:
        self.steps.append("close")
        raise EOFError


def _exec_on(channel: DroppedChannel, *, max_output_bytes: int = 1 << 20) -> Any:
    settings = SSHSettings.from_mapping({"host": "login.example", "host_key": HOST_KEY,
                                         "ssh_ca_key_file": "/nonexistent/ca",
                                         "max_output_bytes": max_output_bytes})
    pool = SSHPool(settings, identity=lambda _login: None)  # type: ignore[arg-type,return-value]
    pool._open_channel = lambda _conn: channel  # type: ignore[method-assign]
    conn = type("Conn", (), {"slots": threading.Semaphore(1)})()
    return pool._exec(conn, "cmd", None, 60.0, True)  # type: ignore[arg-type]


def test_a_failed_close_does_not_replace_the_output_cap() -> None:
    """CI: ``head -c 100000`` past a 1 KiB cap raised EOFError from the channel's close
    instead of OutputTooLarge (the connection had dropped meanwhile)."""
    with DroppedChannel(b"0" * 5000) as channel, pytest.raises(OutputTooLarge):
        _exec_on(channel, max_output_bytes=1024)
    assert channel.steps[-1] == "close"


def test_a_failed_close_does_not_lose_a_finished_commands_result() -> None:
    """The command ran and its exit status arrived: its result stands (for sbatch, the
    job id: losing it would turn a submitted job into an unknown outcome)."""
    with DroppedChannel(b"4242\n") as channel:
        result = _exec_on(channel)
    assert (result.exit_status, result.stdout) == (0, "4242\n")
    assert channel.steps == ["exec cmd", "close"]
