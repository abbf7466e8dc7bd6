"""``aifa-broker serve``: the API on one or several worker processes, plus the tracker.

One worker (``--workers 1``): the API and, in the same process, the tracker and
the webhook notifier (as before). Several workers: the parent process only
supervises — it brings the schema up to date once, then starts

- N uvicorn worker processes, each with its own listening socket on the same
  port (``SO_REUSEPORT``: the kernel spreads new connections over the workers),
  its own database pool (sized from the settings) and adapter registry, none
  running the tracker; a worker that dies is started again;
- one background process running the tracker (on its database lease, so two
  broker instances still never track the same cluster twice) and the notifier;
  restarted if it dies.

Why not uvicorn's own ``workers=N``: its workers share one listening socket, and
asyncio accepts every connection waiting at a wake-up (up to the backlog), so one
worker took a burst of connections and their keep-alive requests for good
(measured: 16 clients, one worker at 81 % of a core, the other at 25 %). Every
accepted connection also gets ``TCP_NODELAY`` (:class:`NoDelayHTTPProtocol`).

Counters and histograms are then kept in prometheus-client's multiprocess mode
(files under ``PROMETHEUS_MULTIPROC_DIR``, a fresh directory per start unless
the operator sets one), so ``/metrics`` on any worker reports every process's
sums. Children die with the parent even when it is SIGKILLed (``PR_SET_PDEATHSIG``),
so a restarted broker finds its port free.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from broker.config import Settings, get_settings
from broker.heap import settle_for_serving

log = logging.getLogger(__name__)

#: the app factory of a worker (an import string: workers are spawned processes)
WORKER_FACTORY = "broker.server:worker_app"
_PARENT_ENV = "AIFA_SERVE_PARENT_PID"
_PR_SET_PDEATHSIG = 1
#: pending connections per worker's listening socket
LISTEN_BACKLOG = 2048


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on an accepted TCP connection (no-op otherwise)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # the peer may already be gone
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol with ``TCP_NODELAY`` on every connection.

    Why: asyncio sets ``TCP_NODELAY`` only on accepted sockets whose ``proto`` is
    ``IPPROTO_TCP``; with ``workers > 1`` uvicorn binds the shared listening socket
    as ``socket.socket(AF_INET)`` (proto 0), so its accepted connections kept Nagle's
    algorithm on, and an answer written in two pieces (head, then body) waited for
    the client's delayed ACK. Measured: ``GET /healthz`` p50 48 ms with ``--workers
    2`` against 0.5 ms with one worker; a submission 68 ms against 9 ms."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        set_nodelay(transport)
        super().connection_made(transport)


def default_workers() -> int:
    """Worker processes when none is asked for: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the serving parent dies (Linux)."""
    parent = os.environ.get(_PARENT_ENV)
    if parent is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot ask to die with the parent process; orphans may survive a SIGKILL")
    if str(os.getppid()) != parent:  # the parent died before prctl took effect
        os._exit(1)


def worker_app() -> Any:
    """The app of one worker process (no tracker: the background process runs it)."""
    die_with_parent()
    from broker.api.app import create_app
    from broker.bootstrap import engine_for

    settings = get_settings()
    _configure_logging(settings)
    # the parent migrated already: N workers must not all run the migration check
    return create_app(settings, engine=engine_for(settings, migrate=False), run_tracker=False)


def _background_main() -> None:
    """The tracker + notifier process of a multi-worker broker."""
    die_with_parent()
    from broker.bootstrap import engine_for
    from broker.registry import AdapterRegistry
    from broker.tracker import Tracker
    from broker.webhooks import Notifier

    settings = get_settings()
    _configure_logging(settings)
    engine = engine_for(settings, migrate=False)
    registry = AdapterRegistry(settings)
    tracker, notifier = Tracker(engine, settings, registry), Notifier(engine, settings)
    stop = _stop_on_signals()
    tracker.start()
    notifier.start()
    stop.wait()
    tracker.stop()
    notifier.stop()
    registry.close()


class _KeptAlive:
    """Keeps one child process (spawned ``target(*args)``) running until :meth:`stop`."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...] = (),
                 name: str = "aifa-broker-tracker") -> None:
        self._target, self._args, self._name = target, args, name
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._keep_alive, name=f"{name}-watch", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._watch.start()

    def _spawn(self) -> None:
        self._proc = self._ctx.Process(target=self._target, args=self._args, name=self._name, daemon=False)
        self._proc.start()

    def _keep_alive(self) -> None:
        while not self._stopping.wait(2.0):
            if self._proc is not None and not self._proc.is_alive():
                log.error("process %s exited (code %s); starting it again", self._name, self._proc.exitcode)
                self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(15)
            if self._proc.is_alive():
                self._proc.kill()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM/SIGINT (handlers only from the main thread, where Python
    allows them; elsewhere the caller stops the process another way)."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def listening_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (listening unless
    ``listen`` is false: a bound socket only holds the port)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _claim_port(host: str, port: int) -> socket.socket:
    """Hold ``host:port`` for the workers; fails (SystemExit) when anything else has it,
    also another broker: a plain bind first, since ``SO_REUSEPORT`` alone would let
    two brokers of one user share the port and split its connections."""
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
            probe.bind((host, port))
            port = probe.getsockname()[1]
        return listening_socket(host, port, listen=False)
    except OSError as exc:
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _worker_main(factory: str, host: str, port: int, log_level: str) -> None:
    """One API worker process: the app from ``factory`` on its own listening socket."""
    import uvicorn
    from uvicorn.importer import import_from_string

    die_with_parent()
    app = import_from_string(factory)()
    settle_for_serving()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=NoDelayHTTPProtocol)
    uvicorn.Server(config).run(sockets=[listening_socket(host, port)])


def serve_workers(factory: str, *, host: str, port: int, workers: int, log_level: str) -> None:
    """Run ``workers`` processes of the app made by ``factory`` (an import string) on
    ``host:port`` until SIGTERM/SIGINT; a worker that dies is started again."""
    held = _claim_port(host, port)
    port = held.getsockname()[1]
    stop = _stop_on_signals()
    children = [_KeptAlive(_worker_main, (factory, host, port, log_level), f"aifa-broker-worker-{i}")
                for i in range(workers)]
    try:
        for child in children:
            child.start()
        log.info("serving http://%s:%d with %d worker processes", host, port, workers)
        stop.wait()
    finally:
        for child in children:
            child.stop()
        held.close()


def prepare_multiprocess_metrics(settings: Settings) -> Path:
    """A fresh directory for prometheus-client's multiprocess files, exported to children."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    path = Path(given) if given else settings.data_dir / "metrics" / str(os.getpid())
    if path.exists():
        shutil.rmtree(path)  # counters of a previous run would be added to this one's
    path.mkdir(parents=True, mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _single_app(settings: Settings) -> Any:
    from broker.api.app import create_app

    return create_app(settings)


def run(settings: Settings, *, host: str, port: int, workers: int, factory: str = WORKER_FACTORY,
        single: Callable[[Settings], Any] = _single_app,
        background: Callable[[], None] = _background_main) -> None:
    """Serve until stopped (see the module docstring). ``factory`` (import string of a
    worker's app factory), ``single`` (the one-process app) and ``background`` are
    replaceable for benchmarks (e.g. a build with a stand-in adapter)."""
    import uvicorn

    _configure_logging(settings)
    level = settings.log_level.lower()
    if workers <= 1:
        app = single(settings)
        settle_for_serving()
        uvicorn.run(app, host=host, port=port, log_level=level, http=NoDelayHTTPProtocol)
        return
    from broker.bootstrap import engine_for, ensure_local_cluster

    engine = engine_for(settings)  # migrations once, before any worker starts
    ensure_local_cluster(engine, settings)
    engine.dispose()
    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = prepare_multiprocess_metrics(settings)
    os.environ[_PARENT_ENV] = str(os.getpid())
    tracker = _KeptAlive(background) if settings.run_tracker else None
    if tracker is not None:
        tracker.start()
    try:
        serve_workers(factory, host=host, port=port, workers=workers, log_level=level)
    finally:
        if tracker is not None:
            tracker.stop()
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
