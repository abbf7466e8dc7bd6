"""Supervisor of one job of the ``local`` adapter (dev/demo only).

Started by :class:`adapters.local.LocalAdapter` as
``python -m adapters.local_supervisor <jobdir>``. The process forks once: the
parent waits until the child has started the job (or failed to) and exits, so the
broker never has a child process to reap; the child stays behind, detached from
the broker, and:

- runs the job script (argv, cwd and environment from ``spec.json``, written by
  the adapter) in its own session / process group, stdout and stderr to files in
  the job directory;
- enforces the time limit: SIGTERM to the whole process group, a grace period,
  then SIGKILL (Slurm's ``KillWait``) → ``TIMEOUT``;
- handles a cancel request (a ``cancel`` file in the job directory, or SIGTERM to
  the supervisor) the same way → ``CANCELLED``;
- records everything in ``state.json`` with atomic replaces, so any process can
  read the job's state at any time, and the job survives broker restarts.

Only the standard library is imported: this runs once per job and must start fast.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping
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

_POLL_SLICE = 1.0


# ----------------------------------------------------------------------------- files


def atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file + ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it does not exist (yet)."""
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None


def tag_index_name(tag: str) -> str:
    """File name under ``by-tag/`` for ``tag`` (hex-encoded: any tag is a safe name)."""
    return tag.encode("utf-8").hex()[:240]


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


# ----------------------------------------------------------------------------- supervisor


class Supervisor:
    """Runs one job to its end and keeps ``state.json`` current."""

    def __init__(self, jobdir: Path) -> None:
        self.jobdir = jobdir
        spec = read_json(jobdir / SPEC_FILE)
        if spec is None:
            raise RuntimeError(f"no {SPEC_FILE} in {jobdir}")
        self.spec = spec
        self.state: dict[str, Any] = {"job_id": spec["job_id"], "supervisor_pid": os.getpid(),
                                      "supervisor_start": process_start_ticks(os.getpid())}
        self._cancel_signalled = False
        self._wake_r = -1

    # --- setup

    def claim(self) -> None:
        """Make sure a job directory is started once only."""
        fd = os.open(self.jobdir / STARTED_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)

    def install_signals(self) -> None:
        """SIGTERM/SIGINT = cancel; SIGCHLD and both wake the wait loop through a pipe."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake_r = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGTERM, self._on_cancel_signal)
        signal.signal(signal.SIGINT, self._on_cancel_signal)
        # handlers (not SIG_IGN, which the job would inherit across exec)
        signal.signal(signal.SIGHUP, _ignore_signal)
        signal.signal(signal.SIGCHLD, _ignore_signal)

    def _on_cancel_signal(self, _signum: int, _frame: object) -> None:
        self._cancel_signalled = True

    def cancel_requested(self) -> bool:
        """A cancel came by signal or by the ``cancel`` file."""
        return self._cancel_signalled or (self.jobdir / CANCEL_FILE).exists()

    # --- state

    def write_state(self, **changes: Any) -> None:
        """Update and atomically persist ``state.json``."""
        self.state.update(changes)
        atomic_write_json(self.jobdir / STATE_FILE, self.state)

    def write_tag_index(self) -> None:
        """Record tag -> job id so ``find_by_tag`` needs no scan."""
        tag = self.spec.get("tag")
        if not tag:
            return
        index = self.jobdir.parent / TAG_INDEX_DIR
        index.mkdir(exist_ok=True)
        path = index / tag_index_name(str(tag))
        tmp = index / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_text(str(self.spec["job_id"]), encoding="ascii")
        os.replace(tmp, path)

    # --- running

    def start(self) -> subprocess.Popen[bytes] | None:
        """Start the job; on failure record the job as FAILED and return None."""
        out = open(self.jobdir / STDOUT_FILE, "ab")  # noqa: SIM115 - closed below
        err = open(self.jobdir / STDERR_FILE, "ab")  # noqa: SIM115
        try:
            return subprocess.Popen(  # noqa: S603 - argv from the adapter, no shell
                self.spec["argv"], cwd=self.spec["cwd"], env=self.spec["env"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            err.write(f"aifa-broker local: cannot start the job: {exc}\n".encode())
            code = 127 if exc.errno == errno.ENOENT else 126
            now = time.time()
            self.write_state(state=RAW_FAILED, start_time=now, end_time=now, returncode=code,
                             exit_code=code, reason=f"launch failed: {exc.strerror}")
            return None
        finally:
            out.close()
            err.close()

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def _sleep(self, seconds: float) -> None:
        """Sleep until ``seconds`` pass or a signal (SIGCHLD, SIGTERM) arrives."""
        if seconds > 0:
            select.select([self._wake_r], [], [], seconds)
        self._drain_wakeups()

    def wait(self, proc: subprocess.Popen[bytes]) -> str | None:
        """Wait for the job's end, a cancel or the time limit; returns the forced
        end state (CANCELLED/TIMEOUT) or None when the job ended by itself."""
        deadline = time.monotonic() + float(self.spec["time_limit_seconds"])
        while proc.poll() is None:
            if self.cancel_requested():
                self.kill_tree(proc)
                return RAW_CANCELLED
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill_tree(proc)
                return RAW_TIMEOUT
            self._sleep(min(left, _POLL_SLICE))
        return None

    def kill_tree(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the job's process group, wait the grace period, then SIGKILL."""
        kill_group(proc.pid, signal.SIGTERM)
        grace_end = time.monotonic() + float(self.spec.get("kill_grace_seconds", 5.0))
        while proc.poll() is None and time.monotonic() < grace_end:
            self._sleep(min(grace_end - time.monotonic(), 0.2))
        kill_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def finish(self, proc: subprocess.Popen[bytes], forced: str | None) -> None:
        """Kill leftovers of the job's group and record the end state."""
        kill_group(proc.pid, signal.SIGKILL)  # background children die with the job, as on Slurm
        end = time.time()
        rc = proc.returncode
        if forced is not None:
            state, reason = forced, ("cancelled" if forced == RAW_CANCELLED else "time limit")
        elif rc == 0:
            state, reason = RAW_COMPLETED, None
        else:
            state = RAW_FAILED
            reason = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        self.write_state(state=state, end_time=end, returncode=rc, exit_code=exit_code_of(rc),
                         reason=reason)

    def run(self, ready_fd: int) -> None:
        """Start the job, report readiness on ``ready_fd``, supervise it to its end."""
        self.claim()
        self.install_signals()
        if self.cancel_requested():
            now = time.time()
            self.write_state(state=RAW_CANCELLED, start_time=None, end_time=now, returncode=None,
                             exit_code=None, reason="cancelled before start")
            self.write_tag_index()
            _report(ready_fd, "ok\n")
            return
        proc = self.start()
        if proc is None:
            self.write_tag_index()
            _report(ready_fd, "ok\n")
            return
        self.write_state(state=RAW_RUNNING, pid=proc.pid, pid_start=process_start_ticks(proc.pid),
                         start_time=time.time(), end_time=None, returncode=None,
                         exit_code=None, reason=None)
        self.write_tag_index()
        _report(ready_fd, "ok\n")
        forced = self.wait(proc)
        self.finish(proc, forced)


def _ignore_signal(_signum: int, _frame: object) -> None:
    """A do-nothing handler: the signal only wakes the wait loop."""


def _report(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, message.encode("utf-8", "replace"))
        os.close(fd)


def _redirect_stdio(jobdir: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(jobdir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)


def _child(jobdir: Path, ready_fd: int) -> int:
    try:
        _redirect_stdio(jobdir)
        Supervisor(jobdir).run(ready_fd)
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
    """Fork a detached supervisor for the job directory ``argv[0]``; exit once it runs."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m adapters.local_supervisor JOBDIR\n")
        return 2
    jobdir = Path(args[0])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os._exit(_child(jobdir, w))
    os.close(w)
    message = _read_all(r)
    if message.startswith("ok"):
        return 0
    sys.stderr.write(message or "error: supervisor exited without starting the job\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
