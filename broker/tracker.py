"""The tracker: batched polling, settlement, reconciliation and usage import.

Runs as a thread inside ``aifa-broker serve`` (or alone: ``aifa-broker tracker``).
Per cluster and cycle: ONE ``adapter.poll`` call for all its live jobs. A cluster
that cannot be reached turns its jobs ``UNKNOWN`` (never ``FAILED``) and records
since when; they resume when it answers again. Each cluster's cycle is held by one
replica at a time (PostgreSQL advisory lock), and settlement is idempotent anyway.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.adapter import AdapterError, ClusterAdapter, JobStatus, SchedulerJobRef, UsageRecord
from broker.config import Settings
from broker.cost import cost_micro
from broker.db import session_scope
from broker.metrics import TRACKER_CYCLE
from broker.models import Allocation, Cluster, ClusterAccount, ImportedJob, Job, User, utcnow
from broker.registry import AdapterRegistry
from broker.services import ledger
from broker.services.clusters import adapter_for
from broker.services.jobs import mark_submit_failed, record_submitted, settle
from broker.states import TERMINAL_STATES, JobState

log = logging.getLogger(__name__)
POLLED_STATES = [s.value for s in (JobState.PENDING, JobState.RUNNING, JobState.COMPLETING, JobState.UNKNOWN)]


@contextmanager
def cluster_lease(engine: Engine, cluster_id: int, purpose: str) -> Iterator[bool]:
    """True if this process holds the cluster's ``purpose`` cycle (PostgreSQL advisory
    lock held for the cycle; SQLite is single-process, always True)."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    key = zlib.crc32(f"aifa:{purpose}:{cluster_id}".encode())
    with engine.connect() as conn:
        got = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        try:
            yield got
        finally:
            if got:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


class Tracker:
    """Polls clusters, settles finished jobs, reconciles and imports usage."""

    def __init__(self, engine: Engine, settings: Settings, registry: AdapterRegistry) -> None:
        self.engine = engine
        self.settings = settings
        self.registry = registry
        # per cluster: when its next poll / reconciliation / usage import is due
        self._next_poll: dict[str, float] = {}
        self._next_reconcile: dict[str, float] = {}
        self._next_import: dict[str, float] = {}
        self._next_enforce: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="aifa-tracker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_cycle()
            except Exception:  # the loop must survive any single failure
                log.exception("tracker cycle failed")
            self._stop.wait(self.settings.tracker_interval_seconds)

    def run_cycle(self, *, force: bool = False) -> None:
        """One pass: every due cluster is polled, and reconciled / imported when due."""
        now = time.monotonic()
        with session_scope(self.engine) as session:
            clusters = list(session.exec(select(Cluster).where(Cluster.state != "offline")).all())
        for cluster in clusters:
            name = cluster.name
            if not (force or now >= self._next_poll.get(name, 0.0)):
                continue
            self._next_poll[name] = now + cluster.poll_interval_seconds
            reconcile = force or now >= self._next_reconcile.get(name, 0.0)
            do_import = force or now >= self._next_import.setdefault(name, now + 5.0)
            if reconcile:
                self._next_reconcile[name] = now + self.settings.reconcile_interval_seconds
            if do_import:
                self._next_import[name] = now + self.settings.usage_import_interval_seconds
            interval = self.settings.enforcement_interval_seconds
            enforce = cluster.enforce_budgets and (force or now >= self._next_enforce.setdefault(name, now + interval))
            if enforce:
                self._next_enforce[name] = now + interval
            self._cluster_cycle(cluster, reconcile=reconcile, do_import=do_import, enforce=enforce)

    def _cluster_cycle(self, cluster: Cluster, *, reconcile: bool, do_import: bool, enforce: bool = False) -> None:
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
            if do_import:
                self.import_usage(cluster, adapter)
            if enforce:
                self.enforce(cluster)
            TRACKER_CYCLE.labels(cluster.name).observe(time.perf_counter() - start)

    # --- polling ---------------------------------------------------------------------
    def poll_cluster(self, cluster: Cluster, adapter: ClusterAdapter) -> None:
        """One batched poll; settle what accounting confirms; UNKNOWN when unreachable."""
        with session_scope(self.engine) as session:
            jobs = list(session.exec(self._live_jobs(cluster)).all())
        refs = [SchedulerJobRef(job_id=j.scheduler_job_id or "", username=j.username, tag=j.id,
                                submit_time=j.submitted_at) for j in jobs]
        try:
            statuses = adapter.poll(refs) if refs else []
        except AdapterError as exc:
            self._mark_unreachable(cluster, jobs, exc)
            return
        by_id = {s.job_id: s for s in statuses}
        with session_scope(self.engine) as session:
            self._mark_reachable(session, cluster)
            # one query for the current rows (not one per job); unchanged jobs are not written
            for live in session.exec(self._live_jobs(cluster)).all():
                status = by_id.get(live.scheduler_job_id or "")
                if status is not None:
                    self._apply_status(session, cluster, live, status)

    @staticmethod
    def _live_jobs(cluster: Cluster):  # type: ignore[no-untyped-def]
        return select(Job).where(Job.cluster_id == cluster.id, col(Job.state).in_(POLLED_STATES),
                                 col(Job.scheduler_job_id).is_not(None), col(Job.settled_at).is_(None))

    def _apply_status(self, session: Session, cluster: Cluster, live: Job, status: JobStatus) -> None:
        if status.final and status.state in TERMINAL_STATES:
            settle(session, job=live, status=status, cost_model=cluster.cost_model)
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
        live.state, live.raw_state, live.unknown_since = new_state.value, status.raw_state[:64], None
        live.last_polled_at, live.started_at = utcnow(), started
        live.pending_reason, live.expected_start_at = pending_reason, expected
        session.add(live)

    def _mark_unreachable(self, cluster: Cluster, jobs: list[Job], exc: AdapterError) -> None:
        log.warning("cluster %s unreachable: %s", cluster.name, exc)
        now = utcnow()
        with session_scope(self.engine) as session:
            c = session.get(Cluster, cluster.id)
            assert c is not None
            c.unreachable_since = c.unreachable_since or now
            c.health_ok, c.health_detail, c.health_checked_at = False, str(exc)[:2000], now
            table = Job.__table__  # type: ignore[attr-defined]
            session.execute(
                sa.update(table).where(table.c.id.in_([j.id for j in jobs]), table.c.settled_at.is_(None))
                .values(state=JobState.UNKNOWN.value,
                        unknown_since=sa.func.coalesce(table.c.unknown_since, now))
            )

    def _mark_reachable(self, session: Session, cluster: Cluster) -> None:
        c = session.get(Cluster, cluster.id)
        assert c is not None
        now = utcnow()
        if c.unreachable_since is not None or not c.health_ok:
            c.health_ok, c.health_detail, c.health_checked_at = True, "answering polls", now
        c.unreachable_since = None
        c.last_poll_at = now

    # --- Slurm-native enforcement ------------------------------------------------------
    def enforce(self, cluster: Cluster) -> None:
        """Sync the cluster's allocations into Slurm (on this replica's lease); a failure
        is kept on the cluster for the drift report and metrics, never raised."""
        from broker.errors import BrokerError
        from broker.services.enforcement import record_failure, sync_cluster

        try:
            with session_scope(self.engine) as session:
                sync_cluster(session, principal=None, registry=self.registry, name=cluster.name, dry_run=False)
        except BrokerError as exc:
            log.warning("cluster %s: enforcement sync failed: %s", cluster.name, exc.detail)
            with session_scope(self.engine) as session:
                c = session.get(Cluster, cluster.id)
                if c is not None:
                    record_failure(session, cluster=c, error=exc.detail)

    # --- reconciliation -------------------------------------------------------------
    def _has_stale_accepted(self, cluster: Cluster) -> bool:
        cutoff = utcnow() - timedelta(seconds=self.settings.reconcile_grace_seconds)
        with session_scope(self.engine) as session:
            return session.exec(select(Job.id).where(
                Job.cluster_id == cluster.id, Job.state == JobState.ACCEPTED.value,
                col(Job.created_at) < cutoff)).first() is not None

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
        since = min(j.created_at for j in jobs) - timedelta(hours=1)
        try:
            found = adapter.find_by_tag([j.id for j in jobs], since=since)
        except AdapterError as exc:
            log.warning("cluster %s: reconciliation postponed: %s", cluster.name, exc)
            return
        absent_before = now - timedelta(seconds=self.settings.reconcile_absent_seconds)
        for job in jobs:
            ref = found.get(job.id)
            if ref is not None:
                if record_submitted(self.engine, job_id=job.id, ref=ref):
                    log.info("adopted job %s as %s on %s", job.id, ref.job_id, cluster.name)
            elif job.created_at < absent_before:
                mark_submit_failed(self.engine, job_id=job.id,
                                   reason="not found on the cluster after the submit outcome was lost")

    # --- usage import ----------------------------------------------------------------
    def import_usage(self, cluster: Cluster, adapter: ClusterAdapter) -> int:
        """Charge jobs from accounting that the broker did not submit, exactly once."""
        with session_scope(self.engine) as session:
            allocs = list(session.exec(select(Allocation).where(Allocation.cluster_id == cluster.id)).all())
        accounts = sorted({a.account for a in allocs})
        if not accounts:
            return 0
        since = utcnow() - timedelta(hours=self.settings.usage_lookback_hours)
        try:
            records = adapter.usage(since, accounts=accounts)
        except AdapterError as exc:
            log.warning("cluster %s: usage import postponed: %s", cluster.name, exc)
            return 0
        imported = 0
        for record in records:
            try:
                imported += self._import_one(cluster, allocs, record)
            except Exception:  # one bad record never aborts the batch
                log.exception("cluster %s: usage record %s skipped", cluster.name, record.job_id)
        return imported

    def _import_one(self, cluster: Cluster, allocs: list[Allocation], record: UsageRecord) -> int:
        if record.state not in TERMINAL_STATES:
            return 0
        with session_scope(self.engine) as session:
            if _is_broker_job(session, cluster, record):
                return 0
            alloc = _allocation_for(allocs, record)
            if alloc is None:
                return 0
            if _already_imported(session, cluster, record):
                return 0
            charge = cost_micro(cluster.cost_model, partition=record.partition, unit=alloc.unit,
                                tres=record.alloc_tres, seconds=record.elapsed_seconds)
            user_id = _user_for_posix(session, cluster, record.username)
            row = ImportedJob(cluster_id=cluster.id or 0, allocation_id=alloc.id or 0,
                              scheduler_job_id=record.job_id, global_id=record.global_id,
                              submit_time=record.submit_time,
                              account=record.account, username=record.username, user_id=user_id,
                              partition=record.partition, state=record.state.value,
                              elapsed_seconds=record.elapsed_seconds, alloc_tres=dict(record.alloc_tres),
                              charged=charge, end_time=record.end_time)
            try:
                with session.begin_nested():
                    session.add(row)
                    session.flush()
            except IntegrityError:
                return 0  # imported concurrently by another replica
            ledger.apply(session, allocation=alloc, kind="import", amount=charge, actor="usage-import",
                         reason=f"{cluster.name} job {record.job_id} (not submitted via the broker)",
                         imported_job_id=row.id, user_id=user_id, occurred_at=record.end_time)
            return 1


def _already_imported(session: Session, cluster: Cluster, record: UsageRecord) -> bool:
    """Imported before: same (job id, submit time), or the same globally unique id."""
    same_key = (col(ImportedJob.scheduler_job_id) == record.job_id) & \
        (col(ImportedJob.submit_time) == record.submit_time)
    match = same_key | (col(ImportedJob.global_id) == record.global_id) if record.global_id else same_key
    return session.exec(select(ImportedJob.id).where(
        ImportedJob.cluster_id == cluster.id, match)).first() is not None


def _is_broker_job(session: Session, cluster: Cluster, record: UsageRecord) -> bool:
    if record.tag and session.get(Job, record.tag) is not None:
        return True
    return session.exec(select(Job.id).where(
        Job.cluster_id == cluster.id, Job.scheduler_job_id == record.job_id)).first() is not None


def _allocation_for(allocs: list[Allocation], record: UsageRecord) -> Allocation | None:
    day = (record.end_time or record.submit_time).date()
    matching = [a for a in allocs if a.account == record.account]
    valid = [a for a in matching if (a.start_date is None or a.start_date <= day)
             and (a.end_date is None or day <= a.end_date)]
    pool = valid or matching
    return max(pool, key=lambda a: a.id or 0) if pool else None


def _user_for_posix(session: Session, cluster: Cluster, username: str) -> int | None:
    row = session.exec(select(User.id).join(ClusterAccount, ClusterAccount.user_id == User.id)  # type: ignore[arg-type]
                       .where(ClusterAccount.cluster_id == cluster.id,
                              ClusterAccount.username == username)).first()
    return row

