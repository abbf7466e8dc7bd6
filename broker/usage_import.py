"""Usage import: jobs found in a scheduler's accounting that the broker did not
submit are charged to the allocation whose account they spent, exactly once.

Runs on its own thread and schedule (:class:`UsageImporter`), never inside the
tracker's polling cycle, so a long accounting import cannot delay polling. Rules
(each is a fact about the job, never its name):

- **One scheduler, one import.** Definitions that reach the same scheduler (same
  ``scheduler_identity``, discovered at registration, e.g. one Slurm cluster
  registered as ``-ssh`` and ``-rest``) form one group: one replica imports the
  group under a lease keyed on the identity, through one of its definitions, over
  the allocations of all of them. Duplicates are recognised across the group.
- **Broker jobs are known by their recorded scheduler id.** A record is a broker
  job only if a broker job on a definition of the group has that scheduler job id
  recorded, with a submit time close to the record's. A job merely *named* after a
  broker job (``….aifa-<id>``) is imported like any direct job. The one exception
  is a record whose tag names a broker job that is still waiting for
  reconciliation (``ACCEPTED`` without a scheduler id): it is deferred (not
  imported, the watermark held before it) until the reconciler has adopted that
  job — after checking user, account and submit time — or declared it absent.
- **Attribution by account and membership.** Candidates are the group's
  allocations with the record's account, valid on the job's end date (else any
  with that account). Among them, those whose project has the job's user as a
  member (user found through the cluster accounts of the group) come first; among
  several, the most recently granted wins. A job of a user who is a member of none
  is still charged to the account's allocation (the budget was spent), attributed
  to the POSIX name. Two projects cannot share an account on one scheduler over
  overlapping dates: the grant is refused (see ``services.projects``).
- **No empty charges.** A job that used nothing is recorded (so it is never looked
  at again) but writes no ledger entry.
- **Incremental and bounded.** Each cycle asks accounting for jobs that ended
  after the group's watermark minus an overlap (late accounting records), at most
  ``usage_lookback_hours`` back, processes at most ``usage_import_batch`` records
  past the watermark in end-time order (the overlap is re-checked on top: it is
  mostly imported already and cheap), and moves the watermark to the last end time
  processed.
- **Read in windows that fit.** A window longer than ``usage_import_max_span_hours``
  is read in slices (``usage(since, until=...)``), oldest first; the last slice is
  open-ended, as a single read always was. A read that fails as too large
  (``output_too_large``: past the transport's cap) is retried on half its window,
  down to :data:`MIN_WINDOW`; one that timed out (``command_timeout``: a slurmrestd
  builds its whole answer before sending any of it) is halved once per cycle, as
  it may as well be a daemon that hangs. A window still too large at
  :data:`MIN_WINDOW` (or from an adapter that cannot bound a read) is read per half
  of the group's accounts, down to one account; one account's window too large even
  then (jobs ending in the same second: no narrower window exists) is read as a
  stream (``adapter.iter_usage``) and imported whole, :data:`_COMMIT_EVERY` records
  at a time, the watermark moved over it only once all of it was read. An adapter
  that cannot stream it (or a record past its cap) stops the import there (an
  error every cycle; ``aifa_usage_import_stuck_total`` and
  ``aifa_usage_import_lag_seconds`` grow), skipping nothing. The narrower span is kept for the group's
  next slices and cycles and doubles back after each slice with fewer than
  :data:`SPARSE_RECORDS` records: up to the maximum, and within one cycle never
  past a width that failed in it (a cycle that has halved its way past a dense
  spot reads on through the quiet hours after it without failing there again).
  Slices are imported in end-time order, within the one batch of the cycle, and
  the watermark moves as it always did: to the last end time processed, never over
  a slice merely read empty, since records can reach accounting late (after a
  slurmdbd outage, in order). A read that fails after others succeeded ends the
  cycle there. An adapter whose ``usage`` takes no ``until`` (a plugin written
  before it existed) is read in one call, as before; a window too large for it
  postpones the import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.account_names import canonical_account
from broker.adapter import AdapterError, ClusterAdapter, UsageRecord, usage_accepts_until
from broker.background import BackgroundLoop
from broker.config import Settings
from broker.cost import cost_micro, find_partition, memory_rule
from broker.db import session_scope
from broker.metrics import TRACKER_CYCLE, USAGE_IMPORT_SPLITS, USAGE_IMPORT_STREAMS, USAGE_IMPORT_STUCK
from broker.models import Allocation, Cluster, ClusterAccount, ImportedJob, Job, Membership, utcnow
from broker.registry import AdapterRegistry
from broker.services import ledger
from broker.services.clusters import adapter_for, scheduler_group_ids
from broker.states import TERMINAL_STATES, JobState

log = logging.getLogger(__name__)

#: a broker job's recorded submit time and the scheduler's may differ by this much
#: (the broker records "now" right after the submit call; adopted jobs the scheduler's)
SUBMIT_TIME_TOLERANCE = timedelta(hours=1)
_CHUNK = 500
_COMMIT_EVERY = 200
#: a window too large to read is halved down to this span; one still too large at this
#: span stops the group's import (logged as an error: raise the transport's cap)
MIN_WINDOW = timedelta(minutes=1)
#: a window with fewer records than this was sparse: the next one may be twice as long
SPARSE_RECORDS = 1000
#: the code of :class:`broker.adapter.OutputTooLarge` (plugins may raise a plain AdapterError with it)
TOO_LARGE = "output_too_large"
#: an accounting read sent but not answered in time (slurm_ssh, slurm_rest)
TIMED_OUT = "command_timeout"


def group_key(cluster: Any) -> str:
    """The scheduler a definition reaches: its identity, else the definition itself
    (``cluster``: a :class:`Cluster` or a row of its ``name`` and ``scheduler_identity``)."""
    return cluster.scheduler_identity or f"definition:{cluster.name}"


_CLUSTERS: sa.Table = Cluster.__table__  # type: ignore[attr-defined]
#: what :func:`group_key` reads of every definition that is not offline
_GROUPS_STATEMENT = sa.select(_CLUSTERS.c.name, _CLUSTERS.c.scheduler_identity).where(
    _CLUSTERS.c.state != "offline")


class UsageImporter(BackgroundLoop):
    """Imports accounting usage per scheduler on its own thread (see the module docstring)."""

    thread_name = "aifa-usage-import"
    failure_message = "usage import cycle failed"

    def __init__(self, engine: Engine, settings: Settings, registry: AdapterRegistry) -> None:
        super().__init__()
        self.engine = engine
        self.settings = settings
        self.registry = registry
        self._next: dict[str, float] = {}
        #: per group: the span its last reads fitted in (narrowed by too-large reads)
        self._span: dict[str, timedelta] = {}

    def pause_seconds(self) -> float:
        return min(self.settings.tracker_interval_seconds, 1.0)

    def run_cycle(self, *, force: bool = False) -> int:
        """Import every due scheduler group once; returns the number of jobs imported."""
        from broker.tracker import named_lease

        now = time.monotonic()
        with session_scope(self.engine) as session:
            # a look at the groups first (three plain columns): this runs every second,
            # an import is due every few minutes, and loading the definitions (JSON
            # columns, ORM objects) every second was most of the idle process's CPU
            keys = {group_key(r) for r in session.execute(_GROUPS_STATEMENT)}
            if not force and all(now < self._next.get(k, 0.0) for k in keys):
                return 0
            clusters = list(session.exec(select(Cluster).where(Cluster.state != "offline")
                                         .order_by(col(Cluster.id))).all())
        groups: dict[str, list[Cluster]] = {}
        for c in clusters:  # one import per scheduler, through its first registered definition
            groups.setdefault(group_key(c), []).append(c)
        imported = 0
        for key, members in groups.items():
            if not (force or now >= self._next.setdefault(key, now + 5.0)):
                continue
            self._next[key] = now + self.settings.usage_import_interval_seconds
            with named_lease(self.engine, f"usage-import:{key}") as held:
                if not held:
                    continue
                for cluster in members:  # the next definition when one cannot read accounting
                    count = self.import_group(cluster)
                    if count is not None:
                        imported += count
                        break
        return imported

    def import_group(self, cluster: Cluster) -> int | None:
        """One bounded, incremental import through ``cluster`` for its whole group;
        None when ``cluster``'s adapter could not read accounting."""
        start = time.perf_counter()
        with session_scope(self.engine) as session:
            ids = scheduler_group_ids(session, cluster)
            allocs = list(session.exec(select(Allocation).where(col(Allocation.cluster_id).in_(ids))).all())
            watermark = max((c.usage_imported_until for c in session.exec(
                select(Cluster).where(col(Cluster.id).in_(ids))).all() if c.usage_imported_until), default=None)
        accounts = sorted({a.account for a in allocs})
        if not accounts:
            return 0
        now = utcnow()
        since = now - timedelta(hours=self.settings.usage_lookback_hours)
        if watermark is not None:
            since = max(since, watermark - timedelta(minutes=self.settings.usage_import_overlap_minutes))
        try:
            adapter = adapter_for(self.registry, cluster)
        except AdapterError as exc:
            log.warning("cluster %s: usage import postponed: %s", cluster.name, exc)
            return None
        key = group_key(cluster)
        run = _Run(watermark=watermark, budget=self.settings.usage_import_batch)
        max_span = timedelta(hours=self.settings.usage_import_max_span_hours)
        # None: this adapter cannot bound a read (no ``until``), one open read as before
        span = min(self._span.get(key, max_span), max_span) if usage_accepts_until(adapter) else None
        # no read in this cycle grows past half a window that failed (each failure would repeat)
        lo, ceiling, timeout_halved = since, max_span, False
        while True:
            hi = lo + span if span is not None and lo + span < now else None  # None: up to now
            width = (hi or now) - lo
            try:  # a window that cannot be narrowed any more is read per subset of accounts
                records, streamed = self._read(adapter, lo, hi, accounts, first=lo == since,
                                               split=cluster.name if span is None or width <= MIN_WINDOW else None,
                                               stream=span is not None)
                if streamed:
                    self._process_whole(adapter, cluster, ids, allocs, records, streamed, run,
                                        since=lo, until=hi, first=lo == since)
            except AdapterError as exc:
                retry = exc.code == TOO_LARGE or (exc.code == TIMED_OUT and not timeout_halved)
                if span is not None and retry and width > MIN_WINDOW:
                    timeout_halved = timeout_halved or exc.code == TIMED_OUT
                    span = ceiling = max(width / 2, MIN_WINDOW)
                    log.info("cluster %s: accounting window %s..%s not read (%s); reading %s at a time",
                             cluster.name, lo, hi or "now", exc.code, span)
                    continue
                self._span[key] = span or max_span
                if exc.code == TOO_LARGE:  # it will fail the same way every cycle: say what helps
                    USAGE_IMPORT_STUCK.labels(cluster.name).inc()
                    log.error("cluster %s: usage import stuck at %s: %s; %s", cluster.name, lo, exc,
                              "raise the adapter's output cap (docs/usage-import.md)" if span is not None else
                              "its adapter's usage() takes no `until`, so the window cannot be read in parts")
                else:
                    log.warning("cluster %s: usage import %s: %s", cluster.name,
                                "postponed" if run.reads == 0 else f"stops at {lo} this cycle", exc)
                if run.reads == 0:
                    return None  # the group's next definition may read it
                break
            if not streamed:
                self._process(cluster, ids, allocs, records, run)
            if run.more or run.held_before is not None or hi is None or run.budget == 0:
                break
            if span is not None and len(records) < SPARSE_RECORDS:
                span = min(span * 2, ceiling)  # sparse again: fewer, wider reads
            lo = hi
        self._span[key] = span or max_span
        new_mark = run.mark
        if run.held_before is not None and (new_mark is None or run.held_before < new_mark):
            new_mark = run.held_before - timedelta(seconds=1)
        if new_mark is not None and (watermark is None or new_mark > watermark):
            with session_scope(self.engine) as session:
                table = Cluster.__table__  # type: ignore[attr-defined]
                session.execute(sa.update(table).where(table.c.id.in_(ids)).values(usage_imported_until=new_mark))
        TRACKER_CYCLE.labels(f"{cluster.name}:usage-import").observe(time.perf_counter() - start)
        if run.more:
            log.info("cluster %s: usage import continues next cycle (%d new records imported up to %s)",
                     cluster.name, self.settings.usage_import_batch - run.budget, new_mark)
        return run.imported

    def _read(self, adapter: ClusterAdapter, since: datetime, until: datetime | None, accounts: list[str], *,
              first: bool, split: str | None = None, stream: bool = False) -> tuple[list[UsageRecord], list[str]]:
        """The finished records of one window in end-time order, and the accounts
        whose records must be streamed (:meth:`ClusterAdapter.iter_usage`). The end
        times are checked here too (an adapter may take ``until`` through
        ``**kwargs`` and ignore it); a later window drops records ending exactly at
        its start, which the window before it handled.

        With ``split`` (the cluster's name: the window cannot be narrowed any more),
        an answer too large is asked again for each half of ``accounts``, down to
        one account: every record has one account, so the halves together are the
        window's records, each once. One account's answer still too large is left
        to a stream (``stream``: the adapter takes ``until``), else raised."""
        try:
            if until is None:
                found = adapter.usage(since, accounts=accounts)
            else:
                found = adapter.usage(since, accounts=accounts, until=until)
            streamed: list[str] = []
        except AdapterError as exc:
            if split is None or exc.code != TOO_LARGE:
                raise
            if len(accounts) < 2:
                if not stream:
                    raise
                USAGE_IMPORT_STREAMS.labels(split).inc()
                log.info("cluster %s: accounting window %s..%s too large for account %s; streaming it",
                         split, since, until or "now", accounts[0])
                return [], accounts
            USAGE_IMPORT_SPLITS.labels(split).inc()
            half = len(accounts) // 2
            log.info("cluster %s: accounting window %s..%s too large for %d accounts; reading %d and %d",
                     split, since, until or "now", len(accounts), half, len(accounts) - half)
            found, streamed = [], []
            for part in (accounts[:half], accounts[half:]):
                got, more = self._read(adapter, since, until, part, first=first, split=split, stream=stream)
                found.extend(got)
                streamed.extend(more)
        return sorted((r for r in found if _in_window(r, since, until, first=first)),
                      key=lambda r: (_end(r), r.job_id)), streamed

    def _process_whole(self, adapter: ClusterAdapter, cluster: Cluster, ids: list[int], allocs: list[Allocation],
                       records: list[UsageRecord], streamed: list[str], run: _Run, *,
                       since: datetime, until: datetime | None, first: bool) -> None:
        """Import a whole narrowest window, part of it (``streamed`` accounts) read as
        a stream: every record of the window, whatever the batch (the stream's order
        is not end-time order, so the watermark cannot stop inside the window), at
        most :data:`_COMMIT_EVERY` streamed records held at a time. The watermark
        moves over the window only once all of it was read; a stream failing
        midway raises, and what it imported is recognised when the window is read
        again (by scheduler job id, as every re-read overlap is)."""
        run.reads += 1
        last: list[datetime] = []

        def take(batch: list[UsageRecord]) -> None:
            imported, held_before = self.import_records(cluster, ids, allocs, batch)
            run.imported += imported
            if held_before is not None:
                run.held_before = held_before if run.held_before is None else min(run.held_before, held_before)
            run.budget = max(0, run.budget - sum(1 for r in batch if run.watermark is None or _end(r) > run.watermark))
            last.extend([max(_end(r) for r in batch)] if batch else [])

        take(records)
        for account in streamed:
            chunk: list[UsageRecord] = []
            found = adapter.iter_usage(since, accounts=[account], until=until)
            try:
                for record in found:
                    if _in_window(record, since, until, first=first):
                        chunk.append(record)
                    if len(chunk) == _COMMIT_EVERY:
                        take(chunk)
                        chunk = []
            finally:  # an abandoned stream frees its connection
                close = getattr(found, "close", None)
                if close is not None:
                    close()
            take(chunk)
        if last:
            run.advance(max(last))

    def _process(self, cluster: Cluster, ids: list[int], allocs: list[Allocation],
                 records: list[UsageRecord], run: _Run) -> None:
        """Import one window's records (sorted by end) within the cycle's batch
        (``run.more`` when the batch ended first)."""
        # the overlap before the watermark is re-checked (cheap: mostly imported already) but
        # does not count against the batch, or a busy overlap window would stall the import
        watermark = run.watermark
        reread = [r for r in records if watermark is not None and _end(r) <= watermark]
        new = records[len(reread):]
        taken = new[: run.budget]
        batch = reread + taken
        run.budget -= len(taken)
        run.reads += 1
        imported, held_before = self.import_records(cluster, ids, allocs, batch)
        run.imported += imported
        if held_before is not None:
            run.held_before = held_before if run.held_before is None else min(run.held_before, held_before)
        if batch:
            run.advance(max(_end(r) for r in batch))
        run.more = len(taken) < len(new)

    def import_records(self, cluster: Cluster, ids: list[int], allocs: list[Allocation],
                       records: Sequence[UsageRecord]) -> tuple[int, datetime | None]:
        """Import ``records`` (finished jobs seen through ``cluster``) for the group ``ids``.

        Returns the number imported and the earliest end time of a deferred record
        (the watermark must stay before it), or None."""
        imported = 0
        deferred: datetime | None = None
        # short transactions: SQLite serialises writers, API requests must not wait long
        for start in range(0, len(records), _COMMIT_EVERY):
            chunk = records[start:start + _COMMIT_EVERY]
            count, held = self._import_chunk(cluster, ids, allocs, chunk)
            imported += count
            if held is not None:
                deferred = held if deferred is None else min(deferred, held)
        return imported, deferred

    def _import_chunk(self, cluster: Cluster, ids: list[int], allocs: list[Allocation],
                      records: Sequence[UsageRecord]) -> tuple[int, datetime | None]:
        imported = 0
        deferred: datetime | None = None
        # the allocations' balances move once, at the end of the chunk: their row locks
        # (which submissions queue for) are then held only until this commit
        pending = ledger.PendingBalances()
        with session_scope(self.engine) as session:
            known = _broker_jobs(session, ids, records)
            waiting = _awaiting_reconciliation(session, ids, records)
            done = _imported_keys(session, ids, records)
            members = _memberships(session, ids, {r.username for r in records})
            for record in records:
                if record.state not in TERMINAL_STATES or _is_broker_job(known, record):
                    continue
                if record.tag and record.tag in waiting:
                    end = record.end_time or record.submit_time
                    deferred = end if deferred is None else min(deferred, end)
                    continue
                if (record.job_id, _key_time(record.submit_time)) in done or \
                        (record.global_id and record.global_id in done):
                    continue
                alloc = attribute(allocs, record, members.get(record.username, (None, set())))
                if alloc is None:
                    continue
                if self._import_one(session, cluster, alloc, record, members, pending):
                    imported += 1
                done.add((record.job_id, _key_time(record.submit_time)))
            pending.apply(session)
        return imported, deferred

    def _import_one(self, session: Session, cluster: Cluster, alloc: Allocation, record: UsageRecord,
                    members: dict[str, tuple[int | None, set[int]]],
                    pending: ledger.PendingBalances | None = None) -> bool:
        # the memory rule of the estimate and of broker jobs' charges: max(CPUs, memory share)
        partition = find_partition(cluster.partitions, record.partition)
        charge = cost_micro(cluster.cost_model, partition=record.partition, unit=alloc.unit,
                            tres=memory_rule(record.alloc_tres, partition), seconds=record.elapsed_seconds)
        user_id = members.get(record.username, (None, set()))[0]
        row = ImportedJob(cluster_id=cluster.id or 0, allocation_id=alloc.id or 0,
                          scheduler_job_id=record.job_id, global_id=record.global_id,
                          submit_time=record.submit_time, account=record.account,
                          username=record.username, user_id=user_id, partition=record.partition,
                          state=record.state.value, elapsed_seconds=record.elapsed_seconds,
                          alloc_tres=dict(record.alloc_tres), charged=charge, end_time=record.end_time)
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
        except IntegrityError:
            return False  # imported concurrently by another replica
        if charge <= 0:
            return False  # recorded (never looked at again), but nothing to charge
        ledger.apply(session, allocation=alloc, kind="import", amount=charge, actor="usage-import",
                     reason=f"{cluster.name} job {record.job_id} (not submitted via the broker)",
                     imported_job_id=row.id, user_id=user_id, occurred_at=record.end_time, pending=pending)
        return True


@dataclass
class _Run:
    """What one import cycle of a group has done so far."""

    watermark: datetime | None
    #: new records (past the watermark) this cycle may still process
    budget: int
    reads: int = 0
    imported: int = 0
    #: the watermark may move up to here (end of what was processed)
    mark: datetime | None = None
    #: earliest end of a deferred record: the watermark must stay before it
    held_before: datetime | None = None
    #: the batch ended the cycle before the window did
    more: bool = False

    def advance(self, moment: datetime) -> None:
        self.mark = moment if self.mark is None else max(self.mark, moment)


def _end(record: UsageRecord) -> datetime:
    return record.end_time or record.submit_time


def _in_window(record: UsageRecord, since: datetime, until: datetime | None, *, first: bool) -> bool:
    """A finished record of the window ``(since, until]`` (``[since, until]`` for the
    cycle's first window)."""
    return record.state in TERMINAL_STATES and (first or _end(record) > since) \
        and (until is None or _end(record) <= until)


def attribute(allocs: Iterable[Allocation], record: UsageRecord,
              user: tuple[int | None, set[int]]) -> Allocation | None:
    """The allocation a direct job is charged to (see the module docstring)."""
    day = (record.end_time or record.submit_time).date()
    account = canonical_account(record.account)
    matching = [a for a in allocs if canonical_account(a.account) == account]
    valid = [a for a in matching if (a.start_date is None or a.start_date <= day)
             and (a.end_date is None or day <= a.end_date)]
    pool = valid or matching
    _, projects = user
    mine = [a for a in pool if a.project_id in projects]
    pool = mine or pool
    return max(pool, key=lambda a: a.id or 0) if pool else None


def _key_time(moment: datetime) -> datetime:
    """Submit times compared at whole seconds, in UTC (databases differ in precision)."""
    return moment.replace(microsecond=0, tzinfo=moment.tzinfo)


def _chunks(values: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i:i + _CHUNK]


def _broker_jobs(session: Session, ids: list[int], records: Sequence[UsageRecord]) -> dict[str, list[datetime | None]]:
    """Scheduler job id → recorded submit times of broker jobs with that id in the group."""
    found: dict[str, list[datetime | None]] = {}
    for chunk in _chunks(sorted({_scheduler_job(r) for r in records})):
        for job_id, submitted in session.exec(select(Job.scheduler_job_id, Job.submitted_at).where(
                col(Job.cluster_id).in_(ids), col(Job.scheduler_job_id).in_(chunk))).all():
            found.setdefault(str(job_id), []).append(submitted)
    return found


def _scheduler_job(record: UsageRecord) -> str:
    """The id a broker job records for this accounting record: the array's id for an
    array task (each task has its own job id in accounting), else the job's."""
    return record.array_job_id or record.job_id


def _is_broker_job(known: dict[str, list[datetime | None]], record: UsageRecord) -> bool:
    """Recorded for a broker job, at about the same time (job ids restart after a
    scheduler loses its state: an old broker job's id is no proof). An array task
    belongs to the broker job recorded with its array's id."""
    for submitted in known.get(_scheduler_job(record), []):
        if submitted is None or abs(submitted - record.submit_time) <= SUBMIT_TIME_TOLERANCE:
            return True
    return False


def _awaiting_reconciliation(session: Session, ids: list[int], records: Sequence[UsageRecord]) -> set[str]:
    tags = sorted({r.tag for r in records if r.tag})
    waiting: set[str] = set()
    for chunk in _chunks(tags):
        waiting.update(str(i) for i in session.exec(select(Job.id).where(
            col(Job.id).in_(chunk), col(Job.cluster_id).in_(ids), Job.state == JobState.ACCEPTED.value,
            col(Job.scheduler_job_id).is_(None))).all())
    return waiting


def _imported_keys(session: Session, ids: list[int], records: Sequence[UsageRecord]) -> set[object]:
    keys: set[object] = set()
    for chunk in _chunks(sorted({r.job_id for r in records})):
        for job_id, submitted, global_id in session.exec(select(
                ImportedJob.scheduler_job_id, ImportedJob.submit_time, ImportedJob.global_id).where(
                col(ImportedJob.cluster_id).in_(ids), col(ImportedJob.scheduler_job_id).in_(chunk))).all():
            keys.add((job_id, _key_time(submitted)))
            if global_id:
                keys.add(global_id)
    global_ids = sorted({r.global_id for r in records if r.global_id})
    for chunk in _chunks(global_ids):
        keys.update(g for g in session.exec(select(ImportedJob.global_id).where(
            col(ImportedJob.cluster_id).in_(ids), col(ImportedJob.global_id).in_(chunk))).all() if g)
    return keys


def _memberships(session: Session, ids: list[int], usernames: set[str]) -> dict[str, tuple[int | None, set[int]]]:
    """POSIX name → (broker user id, ids of the projects that user is a member of),
    through the cluster accounts of the group's definitions."""
    found: dict[str, tuple[int | None, set[int]]] = {}
    for chunk in _chunks(sorted(usernames)):
        rows = session.exec(select(ClusterAccount.username, ClusterAccount.user_id, Membership.project_id)
                            .outerjoin(Membership, col(Membership.user_id) == col(ClusterAccount.user_id))
                            .where(col(ClusterAccount.cluster_id).in_(ids),
                                   col(ClusterAccount.username).in_(chunk))).all()
        for username, user_id, project_id in rows:
            uid, projects = found.get(username, (user_id, set()))
            if project_id is not None:
                projects.add(int(project_id))
            found[username] = (uid, projects)
    return found
