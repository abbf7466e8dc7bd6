"""The tracker: batched polling, settlement and reconciliation; it starts the usage
importer (:mod:`broker.usage_import`) on a thread of its own.

Runs as a thread inside ``aifa-broker serve`` (or alone: ``aifa-broker tracker``).
Per cluster and cycle: ONE ``adapter.poll`` call for all its live jobs. A cluster
that cannot be reached turns its jobs ``UNKNOWN`` (never ``FAILED``) and records
since when; they resume when it answers again. Each cluster's cycle is held by one
replica at a time (PostgreSQL advisory lock), and settlement is idempotent anyway.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker import events
from broker.account_names import canonical_account
from broker.adapter import (
    AdapterError,
    ClusterAdapter,
    Health,
    JobStatus,
    SchedulerJobRef,
    find_by_tag_accepts_accounts,
)
from broker.background import BackgroundLoop
from broker.config import Settings
from broker.db import session_scope
from broker.metrics import TRACKER_CYCLE
from broker.models import Cluster, ImportedJob, Job, UTCDateTime, utcnow
from broker.registry import AdapterRegistry
from broker.services import arrays, settlement
from broker.services.clusters import adapter_for, scheduler_group_ids
from broker.services.jobs import mark_submit_failed, record_submitted
from broker.states import TERMINAL_STATES, JobState
from broker.usage_import import UsageImporter

log = logging.getLogger(__name__)
#: clocks of the broker and the scheduler may differ this much when adopting a job
ADOPT_CLOCK_SKEW = timedelta(minutes=5)
#: ended jobs settled in one transaction (a burst is split: each transaction stays short)
SETTLE_BATCH = 100
POLLED_STATES = [s.value for s in (JobState.PENDING, JobState.RUNNING, JobState.COMPLETING, JobState.UNKNOWN)]


@contextmanager
def cluster_lease(engine: Engine, cluster_id: int, purpose: str) -> Iterator[bool]:
    """True if this process holds the cluster's ``purpose`` cycle (PostgreSQL advisory
    lock held for the cycle; SQLite is single-process, always True)."""
    with named_lease(engine, f"{purpose}:{cluster_id}") as held:
        yield held


@contextmanager
def named_lease(engine: Engine, name: str) -> Iterator[bool]:
    """True if this process holds the lease ``name`` (see :func:`cluster_lease`)."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    key = zlib.crc32(f"aifa:{name}".encode())
    with engine.connect() as conn:
        got = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        try:
            yield got
        finally:
            if got:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


#: what a polling cycle reads of each live job
LIVE_COLUMNS = ("id", "scheduler_job_id", "username", "submitted_at", "project_id", "user_id", "state",
                "raw_state", "unknown_since", "started_at", "pending_reason", "expected_start_at", "array_counts")


def _is_array(row: Any) -> bool:
    """An array job (its task counts are kept from its creation on)."""
    return row.array_counts is not None


@functools.cache
def _live_jobs_statement() -> sa.Select[Any]:
    """A cluster's jobs the scheduler has and that are not settled (built once)."""
    table = Job.__table__  # type: ignore[attr-defined]
    return sa.select(*(table.c[c] for c in LIVE_COLUMNS)).where(
        table.c.cluster_id == sa.bindparam("cluster_id"), table.c.state.in_(POLLED_STATES),
        table.c.scheduler_job_id.is_not(None), table.c.settled_at.is_(None))


@functools.cache
def _status_update_statement() -> sa.Update:
    """One job's new scheduler status, only if it is still unsettled in the state it was read in."""
    table = Job.__table__  # type: ignore[attr-defined]
    # parameter names differ from column names (SQLAlchemy reserves those in UPDATE)
    return (sa.update(table).where(table.c.id == sa.bindparam("b_id"), table.c.state == sa.bindparam("b_was"),
                                   table.c.settled_at.is_(None))
            .values(state=sa.bindparam("b_state"), raw_state=sa.bindparam("b_raw"), unknown_since=None,
                    last_polled_at=sa.bindparam("b_polled", type_=UTCDateTime),
                    started_at=sa.bindparam("b_started", type_=UTCDateTime),
                    pending_reason=sa.bindparam("b_reason"),
                    expected_start_at=sa.bindparam("b_expected", type_=UTCDateTime)))


@functools.cache
def _stale_accepted_statement() -> sa.Select[Any]:
    """A job of the cluster accepted before ``cutoff`` and still without a scheduler's answer."""
    table = Job.__table__  # type: ignore[attr-defined]
    return sa.select(table.c.id).where(
        table.c.cluster_id == sa.bindparam("cluster_id"), table.c.state == JobState.ACCEPTED.value,
        table.c.created_at < sa.bindparam("cutoff", type_=UTCDateTime)).limit(1)


#: the definitions a cycle looks at (built once: it runs every second)
_ONLINE_CLUSTERS = select(Cluster).where(Cluster.state != "offline")


class Tracker(BackgroundLoop):
    """Polls clusters, settles finished jobs, reconciles and imports usage."""

    thread_name = "aifa-tracker"
    failure_message = "tracker cycle failed"

    def __init__(self, engine: Engine, settings: Settings, registry: AdapterRegistry) -> None:
        super().__init__()
        self.engine = engine
        self.settings = settings
        self.registry = registry
        # per cluster: when its next poll / reconciliation / idle health probe is due
        self._next_poll: dict[str, float] = {}
        self._next_reconcile: dict[str, float] = {}
        self._next_enforce: dict[str, float] = {}
        self._next_probe: dict[str, float] = {}
        #: accounting import: its own thread and schedule, never inside a polling cycle
        self.importer = UsageImporter(engine, settings, registry)

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Start polling and the usage importer, each on its own thread."""
        super().start()
        self.importer.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.importer.stop(timeout)
        super().stop(timeout)

    def pause_seconds(self) -> float:
        return self.settings.tracker_interval_seconds

    def run_cycle(self, *, force: bool = False) -> None:
        """One pass: every due cluster is polled, and reconciled when due (usage import
        is :attr:`importer`'s, on its own thread)."""
        now = time.monotonic()
        with session_scope(self.engine) as session:
            clusters = list(session.exec(_ONLINE_CLUSTERS).all())
        for cluster in clusters:
            name = cluster.name
            if not (force or now >= self._next_poll.get(name, 0.0)):
                continue
            self._next_poll[name] = now + cluster.poll_interval_seconds
            reconcile = force or now >= self._next_reconcile.get(name, 0.0)
            if reconcile:
                self._next_reconcile[name] = now + self.settings.reconcile_interval_seconds
            interval = self.settings.enforcement_interval_seconds
            enforce = cluster.enforce_budgets and (force or now >= self._next_enforce.setdefault(name, now + interval))
            if enforce:
                self._next_enforce[name] = now + interval
            self._cluster_cycle(cluster, reconcile=reconcile, enforce=enforce)

    def _cluster_cycle(self, cluster: Cluster, *, reconcile: bool, enforce: bool = False) -> None:
        assert cluster.id is not None
        with cluster_lease(self.engine, cluster.id, "tracker") as held:
            if not held:
                return
            try:
                adapter = adapter_for(self.registry, cluster)
            except AdapterError as exc:
                log.error("cluster %s: adapter unusable: %s", cluster.name, exc)
                return
            start = time.perf_counter()
            self.poll_cluster(cluster, adapter)
            if reconcile or self._has_stale_accepted(cluster):
                self.reconcile_cluster(cluster, adapter)
            if enforce:
                self.enforce(cluster)
            TRACKER_CYCLE.labels(cluster.name).observe(time.perf_counter() - start)

    # --- polling ---------------------------------------------------------------------
    def poll_cluster(self, cluster: Cluster, adapter: ClusterAdapter) -> None:
        """One batched poll; settle what accounting confirms; UNKNOWN when unreachable.

        The live jobs are read once, as plain rows of the columns the comparison needs
        (no ORM objects: memory and CPU stay small at 10,000 jobs); a changed job is
        written with an UPDATE conditional on the state it was read in, so a job that
        moved meanwhile (settled, cancelled) is left to the next cycle."""
        with session_scope(self.engine) as session:
            jobs = session.execute(_live_jobs_statement(), {"cluster_id": cluster.id}).all()
            tasks = arrays.unsettled_task_numbers(session, [j.id for j in jobs if _is_array(j)])
        # an array job is one ref (one scheduler job) naming the tasks still tracked
        refs = [SchedulerJobRef(job_id=j.scheduler_job_id or "", username=j.username, tag=j.id,
                                submit_time=j.submitted_at,
                                array_tasks=tuple(tasks.get(j.id, ()))
                                if _is_array(j) else None) for j in jobs]
        if not refs:
            self._probe_idle(cluster, adapter)
            return
        try:
            statuses = adapter.poll(refs)
        except AdapterError as exc:
            self._mark_unreachable(cluster, jobs, exc)
            return
        by_id = {s.job_id: s for s in statuses}
        ended: list[tuple[str, JobStatus]] = []
        tasks_ended: dict[str, list[tuple[int, JobStatus]]] = {}
        with session_scope(self.engine) as session:
            self._mark_reachable(session, cluster)
            array_ids = [j.id for j in jobs if _is_array(j)]
            if array_ids:  # arrays (few): their rows and tasks as objects, read in this transaction
                live_tasks = arrays.unsettled_tasks(session, array_ids)
                for live in session.exec(select(Job).where(col(Job.id).in_(array_ids),
                                                           col(Job.settled_at).is_(None))).all():
                    self._apply_tasks(session, live, live_tasks.get(live.id, []), by_id, tasks_ended,
                                      grace=self.settings.array_cancel_grace_seconds)
            for row in jobs:  # unchanged jobs are not written
                if _is_array(row):
                    continue
                status = by_id.get(row.scheduler_job_id or "")
                if status is None:
                    continue
                if status.final and status.state in TERMINAL_STATES:
                    ended.append((row.id, status))
                else:
                    self._apply_status(session, cluster, row, status)
        self._settle_ended(cluster, ended)
        for job_id, done in tasks_ended.items():  # an array: its ended tasks, one transaction per job
            with session_scope(self.engine) as session:
                array_job = session.get(Job, job_id)
                if array_job is None or array_job.settled_at is not None:
                    continue
                settlement.settle_tasks(session, job=array_job, done=done, cost_model=cluster.cost_model)
                arrays.refresh(session, job=array_job)

    def _settle_ended(self, cluster: Cluster, ended: list[tuple[str, JobStatus]]) -> None:
        """Settle the cycle's ended jobs, :data:`SETTLE_BATCH` to a transaction
        (:func:`settlement.settle_ended`: the allocations' balances move at the end of
        each, so their row locks, which submissions queue for, are held only from
        there to the commit). A batch that fails is retried job by job, so one job
        that cannot be settled holds back no other."""
        for start in range(0, len(ended), SETTLE_BATCH):
            batch = ended[start:start + SETTLE_BATCH]
            try:
                with session_scope(self.engine) as session:
                    settlement.settle_ended(session, batch, cluster=cluster)
            except sa.exc.SQLAlchemyError:
                log.warning("cluster %s: settling %d jobs together failed; settling them one by one",
                            cluster.name, len(batch), exc_info=True)
                for one in batch:
                    try:
                        with session_scope(self.engine) as session:
                            settlement.settle_ended(session, [one], cluster=cluster)
                    except sa.exc.SQLAlchemyError:  # left for the next cycle, as the others are not
                        log.exception("cluster %s: settling job %s failed", cluster.name, one[0])

    @staticmethod
    def _apply_tasks(session: Session, live: Job, tasks: list[Any], by_id: dict[str, JobStatus],
                     ended: dict[str, list[tuple[int, JobStatus]]], *, grace: float) -> None:
        """An array job: each task's status (``<scheduler id>_<task>``; ``tasks``: rows
        of :func:`arrays.unsettled_tasks`); the changed tasks written in one batch, ended
        ones settled after this batch, the job's aggregate state following its tasks."""
        expected = None
        now = utcnow()
        changes = []
        for task in tasks:
            key = f"{live.scheduler_job_id}_{task.task}"
            status = by_id.get(key)
            gone = arrays.vanished_after_cancel(task, status, key=key, now=now, grace_seconds=grace)
            if gone is not None:
                ended.setdefault(live.id, []).append((task.id, gone))
                continue
            if status is None:
                continue
            change = arrays.task_status_change(task, status)  # an ended task: COMPLETING until settled
            if change is not None:
                changes.append(change)
            if status.final and status.state in TERMINAL_STATES:
                ended.setdefault(live.id, []).append((task.id, status))
                continue
            if status.state == JobState.PENDING and status.expected_start is not None:
                expected = min(expected or status.expected_start, status.expected_start)
        arrays.write_task_changes(session, changes)  # the tasks before the job row (lock order)
        arrays.refresh(session, job=live, expected_start=expected)

    def _apply_status(self, session: Session, cluster: Cluster, live: Any, status: JobStatus) -> None:
        """Write what changed of one live job (``live``: a row of :data:`LIVE_COLUMNS`
        or a loaded job); settle it when accounting says it ended."""
        if status.final and status.state in TERMINAL_STATES:
            settlement.settle_ended(session, [(live.id, status)], cluster=cluster)
            return
        # not final yet: a terminal word from the queue waits for accounting
        new_state = JobState.COMPLETING if status.state in TERMINAL_STATES else status.state
        if new_state == JobState.UNKNOWN:
            return
        started = live.started_at or status.start_time
        # what Slurm says about a waiting job; both cleared once it left the queue
        waiting = new_state == JobState.PENDING
        pending_reason = status.reason[:128] if waiting and status.reason else None
        expected = status.expected_start if waiting else None
        if (live.state, live.raw_state, live.unknown_since, live.started_at, live.pending_reason,
                live.expected_start_at) == (new_state.value, status.raw_state[:64], None, started,
                                            pending_reason, expected):
            return
        moved = session.execute(_status_update_statement(), {
            "b_id": live.id, "b_was": live.state, "b_state": new_state.value, "b_raw": status.raw_state[:64],
            "b_polled": utcnow(), "b_started": started, "b_reason": pending_reason, "b_expected": expected})
        if moved.rowcount and (live.state, live.pending_reason) != (new_state.value, pending_reason):  # type: ignore[attr-defined]
            events.record(session, job_id=live.id, project_id=live.project_id, user_id=live.user_id,
                          state=new_state.value, previous=live.state, pending_reason=pending_reason)

    def _mark_unreachable(self, cluster: Cluster, jobs: Sequence[Any], exc: AdapterError) -> None:
        log.warning("cluster %s unreachable: %s", cluster.name, exc)
        now = utcnow()
        clusters = Cluster.__table__  # type: ignore[attr-defined]
        with session_scope(self.engine) as session:
            # one UPDATE, not ORM attributes: an attribute set to the value the session had
            # loaded is not written, and another writer may have changed the row since
            session.execute(
                sa.update(clusters).where(clusters.c.id == cluster.id)
                .values(unreachable_since=sa.func.coalesce(clusters.c.unreachable_since, now),
                        health_ok=False, health_detail=str(exc)[:2000], health_checked_at=now))
            if not jobs:
                return
            for job in jobs:
                if job.state != JobState.UNKNOWN.value:
                    events.record(session, job_id=job.id, project_id=job.project_id, user_id=job.user_id,
                                  state=JobState.UNKNOWN.value, previous=job.state)
            table = Job.__table__  # type: ignore[attr-defined]
            session.execute(
                sa.update(table).where(table.c.id.in_([j.id for j in jobs]), table.c.settled_at.is_(None))
                .values(state=JobState.UNKNOWN.value,
                        unknown_since=sa.func.coalesce(table.c.unknown_since, now))
            )

    def _probe_idle(self, cluster: Cluster, adapter: ClusterAdapter) -> None:
        """A cluster without live jobs is not contacted by a poll: its health comes
        from a real probe now and then (never "ok" without one)."""
        now = time.monotonic()
        # a cluster marked down (e.g. by a submission that could not connect: its circuit
        # breaker is open) is probed every cycle, so it reopens soon after it answers
        if now < self._next_probe.get(cluster.name, 0.0) and cluster.unreachable_since is None:
            return
        self._next_probe[cluster.name] = now + max(self.settings.reconcile_interval_seconds,
                                                   cluster.poll_interval_seconds)
        try:
            health = adapter.health()
        except AdapterError as exc:  # health() should not raise; be safe anyway
            health = Health(ok=False, detail=str(exc))
        if not health.ok:
            self._mark_unreachable(cluster, [], AdapterError(health.detail))
            return
        with session_scope(self.engine) as session:
            self._mark_reachable(session, cluster, detail=health.detail)

    def _mark_reachable(self, session: Session, cluster: Cluster, detail: str = "answering polls") -> None:
        c = session.get(Cluster, cluster.id)
        assert c is not None
        now = utcnow()
        if c.unreachable_since is not None or not c.health_ok:
            c.health_ok, c.health_detail, c.health_checked_at = True, detail[:2000], now
        c.unreachable_since = None
        c.last_poll_at = now

    # --- Slurm-native enforcement ------------------------------------------------------
    def enforce(self, cluster: Cluster) -> None:
        """Sync the cluster's allocations into Slurm (on this replica's lease); a failure
        is kept on the cluster for the drift report and metrics, never raised."""
        from broker.errors import BrokerError
        from broker.services.enforcement import record_failure, sync_in_background

        try:
            sync_in_background(self.engine, registry=self.registry, name=cluster.name)
        except BrokerError as exc:
            log.warning("cluster %s: enforcement sync failed: %s", cluster.name, exc.detail)
            with session_scope(self.engine) as session:
                c = session.get(Cluster, cluster.id)
                if c is not None:
                    record_failure(session, cluster=c, error=exc.detail)

    # --- reconciliation -------------------------------------------------------------
    def _has_stale_accepted(self, cluster: Cluster) -> bool:
        cutoff = utcnow() - timedelta(seconds=self.settings.reconcile_grace_seconds)
        with self.engine.connect() as conn:  # one read every cycle: no Session, a statement built once
            return conn.execute(_stale_accepted_statement(), {"cluster_id": cluster.id, "cutoff": cutoff}).first() \
                is not None

    def reconcile_cluster(self, cluster: Cluster, adapter: ClusterAdapter) -> None:
        """Adopt ACCEPTED jobs that reached the cluster; fail those proven absent."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.settings.reconcile_grace_seconds)
        with session_scope(self.engine) as session:
            jobs = list(session.exec(select(Job).where(
                Job.cluster_id == cluster.id, Job.state == JobState.ACCEPTED.value,
                col(Job.scheduler_job_id).is_(None), col(Job.created_at) < cutoff)).all())
        if not jobs:
            return
        # Adoption only accepts a job submitted at or after its intent minus the clock
        # skew (_matches_intent), so accounting need not be read from any earlier: on a
        # busy cluster every extra minute of window is thousands of jobs to read, and a
        # window too large to answer postpones reconciliation (it never fails unsafely).
        # No upper bound: a job may become eligible, run and end long after it was submitted.
        since = min(j.created_at for j in jobs) - ADOPT_CLOCK_SKEW
        accounts = sorted({canonical_account(j.account) for j in jobs})
        try:
            if find_by_tag_accepts_accounts(adapter):  # only these accounts' jobs are read
                found = adapter.find_by_tag([j.id for j in jobs], since=since, accounts=accounts)
            else:
                found = adapter.find_by_tag([j.id for j in jobs], since=since)
        except AdapterError as exc:
            log.warning("cluster %s: reconciliation postponed: %s", cluster.name, exc)
            return
        absent_before = now - timedelta(seconds=self.settings.reconcile_absent_seconds)
        for job in jobs:
            ref = found.get(job.id)
            if ref is not None and not self._matches_intent(cluster, job, ref):
                log.warning("cluster %s: job %s carries the tag of broker job %s but not its intent "
                            "(user %s, account %s, submitted %s): not adopted", cluster.name, ref.job_id,
                            job.id, ref.username, ref.account, ref.submit_time)
                ref = None
            if ref is not None:
                if record_submitted(self.engine, job_id=job.id, ref=ref):
                    log.info("adopted job %s as %s on %s", job.id, ref.job_id, cluster.name)
            elif job.created_at < absent_before:
                mark_submit_failed(self.engine, job_id=job.id,
                                   reason="not found on the cluster after the submit outcome was lost")

    def _matches_intent(self, cluster: Cluster, job: Job, ref: SchedulerJobRef) -> bool:
        """A tagged scheduler job is this broker job only if it is what the broker
        intended: same POSIX user, same account (where the adapter reports it),
        submitted in the window after the intent was written, and not already
        imported as a direct job (it would be charged twice)."""
        if ref.username != job.username or (ref.account is not None
                                             and canonical_account(ref.account) != canonical_account(job.account)):
            return False
        if ref.submit_time is not None:
            earliest = job.created_at - ADOPT_CLOCK_SKEW
            latest = job.created_at + timedelta(seconds=self.settings.reconcile_absent_seconds) + ADOPT_CLOCK_SKEW
            if not earliest <= ref.submit_time <= latest:
                return False
        with session_scope(self.engine) as session:
            ids = scheduler_group_ids(session, cluster)
            return session.exec(select(ImportedJob.id).where(
                col(ImportedJob.cluster_id).in_(ids), ImportedJob.scheduler_job_id == ref.job_id)).first() is None
