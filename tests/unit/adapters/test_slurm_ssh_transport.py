"""The SSH transport's channel handling, on a stand-in channel (no network)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import paramiko

from adapters.slurm_ssh.settings import SSHSettings
from adapters.slurm_ssh.transport import PREFERRED_CIPHERS, SSHPool, client_transport
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
