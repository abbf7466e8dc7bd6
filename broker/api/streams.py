"""Waiting on the server: the per-process event hub, long polls and event streams.

Held requests (a long poll, a Server-Sent Events stream) must not hold a worker
thread or a database connection while they wait. So:

* one :class:`EventHub` per process learns new rows of ``job_events`` (written by
  :mod:`broker.events`) in ONE place — a background thread that LISTENs on
  PostgreSQL (woken at each commit by any replica's ``pg_notify``) or polls on
  SQLite every ``event_poll_seconds`` — and hands them to the asyncio waiters of
  the process (``loop.call_soon_threadsafe``). Database work per new batch of
  events: one query, whatever the number of waiters; none while nobody waits.
* a waiter is an ``async`` endpoint awaiting a :class:`Subscription` queue; it
  touches the database only briefly (in a worker thread) to read the job or the
  backlog since ``Last-Event-ID``, never while it waits.
* :class:`StreamSlots` bounds the held requests per user (per process).

Event ids grow in commit order (see :mod:`broker.events`), so "everything after
id N" is exact: a stream resumed with ``Last-Event-ID: N`` misses nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from broker.errors import InvalidRequest, RateLimited
from broker.events import CHANNEL, Transition
from broker.models import JobEvent
from broker.states import TERMINAL_STATES, JobState

log = logging.getLogger(__name__)

TERMINAL = frozenset(s.value for s in TERMINAL_STATES)
#: lifecycle order for "at or past this state" (terminal states all rank last)
_RANK = {JobState.ACCEPTED.value: 0, JobState.PENDING.value: 1, JobState.RUNNING.value: 2,
         JobState.COMPLETING.value: 3, **{s: 4 for s in TERMINAL}}
BATCH = 1000


class TooManyStreams(RateLimited):
    """The caller already holds as many long polls / event streams as allowed."""

    code, title = "too_many_streams", "Too many open streams"


@dataclass(frozen=True)
class Event(Transition):
    """One row of ``job_events``: a transition and its id (commit order)."""

    id: int

    def sse(self, project: str) -> str:
        """The event as one Server-Sent Events message."""
        data = {"id": self.id, "job_id": self.job_id, "project": project, "state": self.state,
                "previous_state": self.previous_state, "pending_reason": self.pending_reason,
                "occurred_at": self.occurred_at.isoformat()}
        return f"id: {self.id}\nevent: job\ndata: {json.dumps(data)}\n\n"


_COLUMNS = ("id", "job_id", "project_id", "user_id", "state", "previous_state", "pending_reason", "occurred_at")


def fetch_events(engine: Engine, *, after: int, job_id: str | None = None, project_id: int | None = None,
                 user_id: int | None = None, limit: int = BATCH) -> list[Event]:
    """Events with id > ``after`` (of one job / project / user when given), oldest first."""
    t = JobEvent.__table__.c  # type: ignore[attr-defined]
    q = sa.select(*(t[c] for c in _COLUMNS)).where(t.id > after)
    if job_id is not None:
        q = q.where(t.job_id == job_id)
    if project_id is not None:
        q = q.where(t.project_id == project_id)
    if user_id is not None:
        q = q.where(t.user_id == user_id)
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(t.id).limit(limit)).all()
    return [Event(**dict(zip(_COLUMNS, row, strict=True))) for row in rows]


def last_event_id(engine: Engine) -> int:
    """The newest event id (0 when there is none)."""
    t = JobEvent.__table__.c  # type: ignore[attr-defined]
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.id), 0))).scalar() or 0)


class Subscription:
    """Events of one job, or of one project (optionally only one user's jobs), as
    they are committed — delivered into an asyncio queue of the subscriber's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, job_id: str | None = None,
                 project_id: int | None = None, user_id: int | None = None, maxsize: int = BATCH) -> None:
        self.loop = loop
        self.job_id, self.project_id, self.user_id = job_id, project_id, user_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        #: set when the queue overflowed (a slow reader): catch up from the database
        self.lagged = False

    def wants(self, event: Event) -> bool:
        return ((self.job_id is None or event.job_id == self.job_id)
                and (self.project_id is None or event.project_id == self.project_id)
                and (self.user_id is None or event.user_id == self.user_id))

    def _deliver(self, event: Event) -> None:  # runs on self.loop
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagged = True

    async def next(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None


class EventHub:
    """One per process: learns new job events and wakes the subscribers (see the
    module docstring). Started by the first subscription; :meth:`close` stops it."""

    #: PostgreSQL: also look for events this often without a notification (a lost
    #: LISTEN connection is reopened; nothing is missed meanwhile, only later)
    SAFETY_POLLS = 20

    def __init__(self, engine: Engine, *, poll_seconds: float = 0.25) -> None:
        self.engine = engine
        self.poll_seconds = poll_seconds
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self._generation = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = 0
        self.fetches = 0  # database reads of new events (one per batch, whatever the waiters)
        #: how new events are learnt: ``listen`` (PostgreSQL LISTEN/NOTIFY) or ``poll``
        self.mode = "listen" if engine.dialect.name == "postgresql" else "poll"

    # --- subscribers (any thread) ---------------------------------------------------------
    async def subscribe(self, **filters: Any) -> Subscription:
        """Events from now on matching ``filters`` (``job_id``, ``project_id``,
        ``user_id``). Subscribe first, then read the backlog: nothing falls between."""
        if self._thread is None:
            await asyncio.to_thread(self._start)
        sub = Subscription(asyncio.get_running_loop(), **filters)
        with self._lock:
            self._subs.add(sub)
            self._generation += 1
        self._wake.set()
        return sub

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            # the mark starts at the newest event: every subscriber reads what came
            # before from the database itself
            self._last = last_event_id(self.engine)
            self._thread = threading.Thread(target=self._run, name="aifa-event-hub", daemon=True)
            self._thread.start()

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    # --- the hub thread ---------------------------------------------------------------------
    def _run(self) -> None:
        listener = None
        postgres = self.mode == "listen"
        polls = 0
        while not self._stop.is_set():
            try:
                if postgres and listener is None:
                    listener = self._listen()
                if listener is not None:
                    notified = self._await_notification(listener, self.poll_seconds * 4)
                    polls += 1
                    if not (notified or polls >= self.SAFETY_POLLS):
                        continue
                    polls = 0
                else:
                    self._stop.wait(self.poll_seconds)
                self._step()
            except Exception:  # the hub must survive a database outage
                log.exception("event hub: reading job events failed; retrying")
                if listener is not None:
                    with suppress(Exception):
                        listener.close()
                    listener = None
                self._stop.wait(1.0)
        if listener is not None:
            with suppress(Exception):
                listener.close()

    def _listen(self) -> Any:
        import psycopg  # the PostgreSQL driver the broker already uses

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = psycopg.connect(url, autocommit=True)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    @staticmethod
    def _await_notification(conn: Any, timeout: float) -> bool:
        return any(True for _ in conn.notifies(timeout=timeout, stop_after=1))

    def _step(self) -> None:
        with self._lock:
            idle, generation = not self._subs, self._generation
        if idle:
            # nobody waits: move the mark forward cheaply instead of reading events —
            # unless someone subscribed meanwhile (they read their backlog themselves,
            # and the hub must go on from an id at most what they saw)
            newest = last_event_id(self.engine)
            with self._lock:
                if not self._subs and generation == self._generation:
                    self._last = max(self._last, newest)
            self._wake.wait(self.poll_seconds * 4)
            self._wake.clear()
            return
        while True:
            events = fetch_events(self.engine, after=self._last)
            self.fetches += 1
            if not events:
                return
            self._last = events[-1].id
            self._dispatch(events)
            if len(events) < BATCH:
                return

    def _dispatch(self, events: list[Event]) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            wanted = [e for e in events if sub.wants(e)]
            for event in wanted:
                try:
                    sub.loop.call_soon_threadsafe(sub._deliver, event)
                except RuntimeError:  # its loop is closed: the waiter is gone
                    self.unsubscribe(sub)
                    break


class StreamSlots:
    """At most ``limit`` held requests (long polls + event streams) per user, per process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, user: str) -> None:
        with self._lock:
            held = self._held.get(user, 0)
            if held >= self.limit:
                raise TooManyStreams(f"You already hold {held} open long polls or event streams "
                                     f"(at most {self.limit}); close one first.", retry_after=5)
            self._held[user] = held + 1

    def release(self, user: str) -> None:
        with self._lock:
            held = self._held.get(user, 0) - 1
            if held > 0:
                self._held[user] = held
            else:
                self._held.pop(user, None)

    @contextmanager
    def hold(self, user: str) -> Iterator[None]:
        self.acquire(user)
        try:
            yield
        finally:
            self.release(user)


# --- long poll ------------------------------------------------------------------------------

def parse_target(text: str) -> str:
    """``wait_for``: a job state (any case) or ``terminal``; 422 otherwise."""
    word = text.strip().upper()
    if word == "TERMINAL" or word in _RANK or word == JobState.UNKNOWN.value:
        return word
    raise InvalidRequest(f"wait_for={text!r} is not a job state; use terminal or one of: "
                         + ", ".join(s.value for s in JobState) + ".")


def reached(state: str, target: str) -> bool:
    """True when a job in ``state`` is at or past ``target`` in its lifecycle (a job
    that has ended answers every wait: nothing more will happen to it)."""
    if state in TERMINAL or state == target:
        return True
    if target == "TERMINAL" or target == JobState.UNKNOWN.value or state not in _RANK:
        return False
    return _RANK[state] >= _RANK.get(target, 99)


async def wait_until(sub: Subscription, target: str, timeout: float) -> bool:
    """Wait until an event of ``sub`` reaches ``target``; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        event = await sub.next(left)
        if event is None:
            return False
        if reached(event.state, target):
            return True
        if sub.lagged:  # the queue overflowed: the caller re-reads the job
            sub.lagged = False
            return True


# --- Server-Sent Events ---------------------------------------------------------------------

async def event_stream(
    hub: EventHub, sub: Subscription, *, project: str, after: int, keepalive: float,
    until_terminal: bool, on_close: Any,
) -> AsyncIterator[str]:
    """The SSE body: the backlog after ``after`` from the database, then live events
    from ``sub``; a ``: keepalive`` comment when quiet. A job's stream ends after its
    terminal event. ``on_close`` runs however the stream ends (client gone included)."""
    last = after

    def since(mark: int) -> list[Event]:
        return fetch_events(hub.engine, after=mark, job_id=sub.job_id, project_id=sub.project_id,
                            user_id=sub.user_id)

    try:
        yield "retry: 2000\n\n"
        while True:  # backlog (and catching up after an overflow), in pages
            backlog = await asyncio.to_thread(since, last)
            for event in backlog:
                yield event.sse(project)
                last = event.id
                if until_terminal and event.state in TERMINAL:
                    return
            if len(backlog) < BATCH:
                break
        while True:
            if sub.lagged:
                sub.lagged = False
                for event in await asyncio.to_thread(since, last):
                    yield event.sse(project)
                    last = event.id
                    if until_terminal and event.state in TERMINAL:
                        return
                continue
            got = await sub.next(keepalive)
            if got is None:
                yield ": keepalive\n\n"
                continue
            if got.id <= last:
                continue  # already sent from the backlog
            yield got.sse(project)
            last = got.id
            if until_terminal and got.state in TERMINAL:
                return
    finally:
        hub.unsubscribe(sub)
        on_close()
