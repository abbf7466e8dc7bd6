"""The supervisor of the ``local`` adapter's jobs (dev/demo only): one per data directory.

Started by :class:`adapters.local.LocalAdapter` as
``python -m adapters.local_supervisor --serve <jobs root>`` the first time a job
is submitted (and again whenever it is gone). The process forks once: the parent
waits until the child listens and exits, so the broker never has a child to
reap; the child stays behind, detached from the broker (its own session), and
outlives broker restarts. It listens on a Linux abstract Unix socket named after
the jobs root (only the broker's own uid may talk to it) for one-line requests:

``start <job id>``
    run the job prepared in ``<root>/<job id>/`` (argv, cwd, environment from
    ``spec.json``, written by the adapter) in its own session / process group,
    stdout and stderr to files in the job directory; answers ``ok`` once the
    job runs (or has been recorded as failed to launch);
``cancel <job id>``
    SIGTERM to the job's process group, a grace period, then SIGKILL
    (Slurm's ``KillWait``) → ``CANCELLED``. A ``cancel`` file in the job
    directory does the same (checked every second), so a cancel is never lost.

For every job it enforces the time limit (same kill sequence → ``TIMEOUT``) and
records everything in the job's ``state.json`` with atomic replaces, so any
process can read a job's state at any time. One process for all jobs keeps the
submit path free of a Python start-up per job (the previous design's cost).

It exits after ``--idle`` seconds without jobs, requests or its jobs root. If it
is killed, its jobs' ``state.json`` still names it: the adapter notices that the
process is gone, kills what is left of the job and records ``NODE_FAIL``.

Only the standard library is imported: this must start fast.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPEC_FILE = "spec.json"
STATE_FILE = "state.json"
CANCEL_FILE = "cancel"
STARTED_FILE = "started"
STDOUT_FILE = "stdout"
STDERR_FILE = "stderr"
SCRIPT_FILE = "script"
LOG_FILE = "supervisor.log"
TAG_INDEX_DIR = "by-tag"

#: raw states the supervisor writes (Slurm words, so the common table applies)
RAW_RUNNING = "RUNNING"
RAW_COMPLETED = "COMPLETED"
RAW_FAILED = "FAILED"
RAW_CANCELLED = "CANCELLED"
RAW_TIMEOUT = "TIMEOUT"
RAW_NODE_FAIL = "NODE_FAIL"
TERMINAL_RAW = frozenset({RAW_COMPLETED, RAW_FAILED, RAW_CANCELLED, RAW_TIMEOUT, RAW_NODE_FAIL})

#: bumped when the request protocol changes, so an old supervisor is never asked
PROTOCOL = "2"
DEFAULT_IDLE_SECONDS = 30.0
_POLL_SLICE = 1.0
_MAX_LINE = 256


# ----------------------------------------------------------------------------- files


def atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file + ``os.replace``).

    Not fsynced (two fsyncs per job were most of a submission's cost): the
    records must survive the broker's and the supervisor's death, which the page
    cache does; a host crash ends every local job anyway, and a record it left
    unreadable reads as a job the adapter does not know."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it does not exist (yet)."""
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (FileNotFoundError, ValueError):  # ValueError: left truncated by a host crash
        return None
    return data if isinstance(data, dict) else None


def tag_index_name(tag: str) -> str:
    """File name under ``by-tag/`` for ``tag`` (hex-encoded: any tag is a safe name)."""
    return tag.encode("utf-8").hex()[:240]


def socket_address(root: Path) -> bytes:
    """The abstract socket name of the supervisor of jobs root ``root`` (per uid)."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return f"\0aifa-broker-local-{PROTOCOL}-{os.getuid()}-{digest}".encode()


# ----------------------------------------------------------------------------- processes


def process_start_ticks(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie ``pid``; None otherwise.

    Together with the pid it identifies a process across pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def same_process_alive(pid: int | None, start_ticks: int | None) -> bool:
    """True when ``pid`` still runs and is the process that started at ``start_ticks``."""
    if not pid:
        return False
    ticks = process_start_ticks(pid)
    return ticks is not None and (start_ticks is None or ticks == start_ticks)


def kill_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to the process group ``pgid``; a group that is gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def exit_code_of(returncode: int | None) -> int | None:
    """Shell-style exit code: the status, or 128 + signal for a killed process."""
    if returncode is None:
        return None
    return returncode if returncode >= 0 else 128 - returncode


# ----------------------------------------------------------------------------- one job


@dataclass
class _Run:
    """A running job: its process and where its kill sequence stands."""

    jobdir: Path
    spec: dict[str, Any]
    state: dict[str, Any]
    proc: subprocess.Popen[bytes]
    deadline: float
    forced: str | None = None
    kill_at: float | None = None

    def write_state(self, **changes: Any) -> None:
        self.state.update(changes)
        atomic_write_json(self.jobdir / STATE_FILE, self.state)

    def begin_kill(self, forced: str, grace: float) -> None:
        """SIGTERM the job's process group; SIGKILL follows after ``grace`` seconds."""
        if self.forced is not None:
            return
        self.forced = forced
        kill_group(self.proc.pid, signal.SIGTERM)
        self.kill_at = time.monotonic() + grace

    def finish(self, returncode: int) -> None:
        """Kill leftovers of the job's group and record the end state."""
        kill_group(self.proc.pid, signal.SIGKILL)  # background children die with the job, as on Slurm
        self.proc.returncode = returncode  # reaped by the supervisor's waitpid(-1)
        if self.forced is not None:
            state, reason = self.forced, ("cancelled" if self.forced == RAW_CANCELLED else "time limit")
        elif returncode == 0:
            state, reason = RAW_COMPLETED, None
        else:
            state = RAW_FAILED
            reason = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        self.write_state(state=state, end_time=time.time(), returncode=returncode,
                         exit_code=exit_code_of(returncode), reason=reason)


def write_tag_index(jobdir: Path, spec: Mapping[str, Any]) -> None:
    """Record tag -> job id so ``find_by_tag`` needs no scan."""
    tag = spec.get("tag")
    if not tag:
        return
    index = jobdir.parent / TAG_INDEX_DIR
    index.mkdir(exist_ok=True)
    path = index / tag_index_name(str(tag))
    tmp = index / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(str(spec["job_id"]), encoding="ascii")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the supervisor


class Supervisor:
    """Runs every job of one jobs root to its end and keeps their ``state.json`` current."""

    def __init__(self, root: Path, listener: socket.socket, *, idle_seconds: float) -> None:
        self.root = root
        self.listener = listener
        self.idle_seconds = idle_seconds
        self.runs: dict[int, _Run] = {}
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self.me = {"supervisor_pid": os.getpid(), "supervisor_start": process_start_ticks(os.getpid())}
        self._stopping = False
        self._last_activity = time.monotonic()
        self._next_scan = 0.0
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake_r = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        # handlers (not SIG_IGN, which jobs would inherit across exec; SIG_IGN on
        # SIGCHLD would also make the kernel reap the jobs before we see their status)
        signal.signal(signal.SIGHUP, _ignore_signal)
        signal.signal(signal.SIGCHLD, _ignore_signal)

    def _on_stop(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    # --- requests

    def start_job(self, job_id: str) -> str:
        """Start the job prepared in ``<root>/<job_id>``; the answer line for the adapter."""
        if not job_id.isdigit():
            return "error: bad job id"
        if self._stopping:
            return "error: the local supervisor is stopping"
        jobdir = self.root / job_id
        spec = read_json(jobdir / SPEC_FILE)
        if spec is None:
            return f"error: no {SPEC_FILE} in {jobdir}"
        try:  # a job directory is started once only (a retried request finds it started)
            os.close(os.open(jobdir / STARTED_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return "ok" if (jobdir / STATE_FILE).exists() else "error: job already claimed"
        state: dict[str, Any] = {"job_id": spec["job_id"], **self.me}
        now = time.time()
        if (jobdir / CANCEL_FILE).exists():
            state.update(state=RAW_CANCELLED, start_time=None, end_time=now, returncode=None,
                         exit_code=None, reason="cancelled before start")
        else:
            proc = self._launch(jobdir, spec, state)
            if proc is not None:
                state.update(state=RAW_RUNNING, pid=proc.pid, pid_start=process_start_ticks(proc.pid),
                             start_time=now, end_time=None, returncode=None, exit_code=None, reason=None)
                self.runs[proc.pid] = _Run(jobdir, spec, state, proc,
                                           time.monotonic() + float(spec["time_limit_seconds"]))
        atomic_write_json(jobdir / STATE_FILE, state)
        write_tag_index(jobdir, spec)
        return "ok"

    @staticmethod
    def _launch(jobdir: Path, spec: Mapping[str, Any], state: dict[str, Any]) -> subprocess.Popen[bytes] | None:
        out = open(jobdir / STDOUT_FILE, "ab")  # noqa: SIM115 - closed below
        err = open(jobdir / STDERR_FILE, "ab")  # noqa: SIM115
        try:
            return subprocess.Popen(  # noqa: S603 - argv from the adapter, no shell
                spec["argv"], cwd=spec["cwd"], env=spec["env"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            err.write(f"aifa-broker local: cannot start the job: {exc}\n".encode())
            code = 127 if exc.errno == errno.ENOENT else 126
            now = time.time()
            state.update(state=RAW_FAILED, start_time=now, end_time=now, returncode=code,
                         exit_code=code, reason=f"launch failed: {exc.strerror}")
            return None
        finally:
            out.close()
            err.close()

    def cancel_job(self, job_id: str) -> str:
        for run in self.runs.values():
            if str(run.spec["job_id"]) == job_id:
                run.begin_kill(RAW_CANCELLED, float(run.spec.get("kill_grace_seconds", 5.0)))
        return "ok"

    def handle(self, line: str) -> str:
        verb, _, arg = line.strip().partition(" ")
        if verb == "start":
            return self.start_job(arg)
        if verb == "cancel":
            return self.cancel_job(arg)
        if verb == "ping":
            return "ok"
        return "error: unknown request"

    # --- event loop

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():  # only the broker's own user may start or cancel jobs
                conn.close()
                continue
            conn.setblocking(False)
            self.clients[conn.fileno()] = (conn, bytearray())

    def _serve_client(self, fd: int) -> None:
        conn, buf = self.clients[fd]
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        buf.extend(data)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            try:
                answer = self.handle(line.decode("utf-8", "replace"))
            except Exception as exc:  # one bad job must not stop the others' supervision
                traceback.print_exc()
                answer = f"error: {type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                conn.setblocking(True)
                conn.sendall(answer.replace("\n", " ").encode("utf-8", "replace") + b"\n")
                conn.setblocking(False)
        if not data or len(buf) > _MAX_LINE:
            del self.clients[fd]
            conn.close()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.runs.pop(pid, None)
            if run is not None:
                run.finish(os.waitstatus_to_exitcode(status))

    def _check_runs(self) -> None:
        now = time.monotonic()
        scan = now >= self._next_scan
        if scan:
            self._next_scan = now + _POLL_SLICE
        for run in list(self.runs.values()):
            grace = float(run.spec.get("kill_grace_seconds", 5.0))
            if run.forced is None:
                if self._stopping or (scan and (run.jobdir / CANCEL_FILE).exists()):
                    run.begin_kill(RAW_CANCELLED, grace)
                elif now >= run.deadline:
                    run.begin_kill(RAW_TIMEOUT, grace)
            if run.kill_at is not None and now >= run.kill_at:
                kill_group(run.proc.pid, signal.SIGKILL)
                run.kill_at = None

    def _timeout(self) -> float:
        now = time.monotonic()
        wake = [self._next_scan]
        for run in self.runs.values():
            wake.append(run.kill_at if run.kill_at is not None else run.deadline)
        return max(0.0, min(min(wake) - now, _POLL_SLICE))

    def _idle(self) -> bool:
        if self.runs or self.clients:
            return False
        if self._stopping or not self.root.is_dir():
            return True
        return time.monotonic() - self._last_activity > self.idle_seconds

    def serve(self) -> None:
        """Supervise until idle (or stopped and every job ended)."""
        self.listener.setblocking(False)
        lfd, wake = self.listener.fileno(), self._wake_r
        while True:
            fds = [lfd, wake, *self.clients]
            readable, _, _ = select.select(fds, [], [], self._timeout())
            if readable:
                self._last_activity = time.monotonic()
            if wake in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake, 512):
                        pass
            self._reap()
            if lfd in readable:
                self._accept()
            for fd in readable:
                if fd in self.clients:
                    self._serve_client(fd)
            self._check_runs()
            if self._idle():
                self._accept()  # someone connected just now: not idle after all
                if self.clients:
                    continue
                # a client connecting in the instant before the close sees the
                # connection reset and starts a new supervisor (the adapter retries)
                self.listener.close()
                return


def _ignore_signal(_signum: int, _frame: object) -> None:
    """A do-nothing handler: the signal only wakes the wait loop."""


# ----------------------------------------------------------------------------- start-up


def bind(root: Path) -> socket.socket | None:
    """The listening socket for ``root``; None when a supervisor already listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(socket_address(root))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    sock.listen(128)
    return sock


def _report(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, message.encode("utf-8", "replace"))
        os.close(fd)


def _redirect_stdio(root: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(root / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)


def _child(root: Path, idle: float, ready_fd: int) -> int:
    try:
        _redirect_stdio(root)
        listener = bind(root)
        if listener is None:  # another one got there first: it serves
            _report(ready_fd, "ok\n")
            return 0
        supervisor = Supervisor(root, listener, idle_seconds=idle)
        _report(ready_fd, "ok\n")
        supervisor.serve()
    except BaseException as exc:  # reported to the adapter, which fails the submit
        traceback.print_exc()
        _report(ready_fd, f"error: {type(exc).__name__}: {exc}\n")
        return 1
    return 0


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def main(argv: list[str] | None = None) -> int:
    """``--serve ROOT [--idle SECONDS]``: fork the detached supervisor; exit once it listens."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 4) or args[0] != "--serve" or (len(args) == 4 and args[2] != "--idle"):
        sys.stderr.write("usage: python -m adapters.local_supervisor --serve ROOT [--idle SECONDS]\n")
        return 2
    root = Path(args[1])
    idle = float(args[3]) if len(args) == 4 else DEFAULT_IDLE_SECONDS
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os._exit(_child(root, idle, w))
    os.close(w)
    message = _read_all(r)
    if message.startswith("ok"):
        return 0
    sys.stderr.write(message or "error: the supervisor exited without listening\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
