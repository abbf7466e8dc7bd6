"""Usage import from accounting (broker/usage_import.py): exactly once per (scheduler,
job id, submit time) and per globally unique id (Slurm 26.05 sluid), keyed on facts
(a recorded scheduler id), never on a job's name; one Slurm cluster registered
twice imports each job once; attribution by account and membership; no empty
charges; incremental, bounded, and on its own thread (polling never waits for it)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import select

from broker.adapter import AdapterError, ClusterUnreachable, JobState, OutputTooLarge, UsageRecord, usage_accepts_until
from broker.db import session_scope
from broker.models import Allocation, Cluster
from broker.services.clusters import adapter_for, scheduler_group_ids
from broker.usage_import import attribute
from tests.integration.test_metrics import _scrape
from tests.support.env import LOCAL_TEST_CONNECTION, BrokerEnv, broker_env


@pytest.fixture
def quiet_env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    """A broker whose background threads do not run: the test drives the importer."""
    with broker_env(tmp_path, db_url, run_tracker=False) as env:
        yield env


def _record(job_id: str, *, global_id: str | None = None, submitted: datetime | None = None,
            account: str = "proj-a", user: str = "bob", tag: str | None = None,
            tres: dict[str, float] | None = None, elapsed: int = 3600) -> UsageRecord:
    submit = submitted or datetime.now(UTC) - timedelta(minutes=10)
    return UsageRecord(job_id=job_id, account=account, username=user, partition="gpu",
                       state=JobState.COMPLETED, raw_state="COMPLETED", submit_time=submit,
                       start_time=submit, end_time=submit + timedelta(seconds=elapsed), elapsed_seconds=elapsed,
                       alloc_tres={"gres/gpu": 2, "cpu": 4} if tres is None else tres, tag=tag,
                       global_id=global_id)


def _cluster(env: BrokerEnv, name: str = "local") -> Cluster:
    with session_scope(env.engine) as s:
        return s.exec(select(Cluster).where(Cluster.name == name)).one()


def _import(env: BrokerEnv, records: list[UsageRecord], *, via: str = "local") -> int:
    importer = env.app.state.tracker.importer
    cluster = _cluster(env, via)
    with session_scope(env.engine) as s:
        ids = scheduler_group_ids(s, cluster)
        allocs = list(s.exec(select(Allocation)).all())
    return importer.import_records(cluster, ids, allocs, records)[0]


def _imported(env: BrokerEnv) -> list[tuple]:
    with env.engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT scheduler_job_id, global_id, charged FROM imported_jobs "
                                         "ORDER BY id")).all())


def _import_ledger(env: BrokerEnv) -> list[tuple]:
    with env.engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT allocation_id, amount FROM ledger_entries "
                                         "WHERE kind = 'import' ORDER BY id")).all())


def _submit(env: BrokerEnv, **over: Any) -> dict:
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": "EHPC-TEST-001", "script": "sleep 0.2", "time_limit_minutes": 1, **over})
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_each_accounting_record_is_charged_exactly_once(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    env.setup_project(unit="gpu_hours", members=("alice", "bob"))
    first = [_record("10"), _record("11", global_id="sAAA"), _record("12", account="other-account")]
    assert _import(env, first) == 2
    assert _import(env, first) == 0  # the next cycle sees the same records
    # job ids restarted (slurmctld state lost): same sluid is the same job, a new sluid is new
    later = datetime.now(UTC) - timedelta(minutes=5)
    assert _import(env, [_record("1", global_id="sAAA", submitted=later),
                         _record("11", global_id="sBBB", submitted=later)]) == 1
    rows = _imported(env)
    assert [(r[0], r[1]) for r in rows] == [("10", None), ("11", "sAAA"), ("11", "sBBB")]
    assert all(r[2] == 2_000_000 for r in rows)  # 2 GPUs × 1 h
    usage = env.call("GET", "/v1/projects/EHPC-TEST-001/usage", env.auth("alice"), params={"group_by": "user"}).json()
    assert usage["rows"] == [{"project": "EHPC-TEST-001", "user": "bob", "unit": "gpu_hours", "amount": 6.0, "jobs": 3}]


def test_broker_jobs_are_known_by_recorded_scheduler_id_not_by_name(quiet_env: BrokerEnv) -> None:
    """Issue 10: a job *named* ``….aifa-<broker job id>`` is a direct job and is imported."""
    env = quiet_env
    env.setup_project(unit="gpu_hours", members=("alice", "bob"))
    job = _submit(env)
    assert job["scheduler_job_id"]
    ours = _record(job["scheduler_job_id"], user="alice", tag=job["id"],
                   submitted=datetime.fromisoformat(job["submitted_at"]))
    forged = _record("777777", user="bob", tag=job["id"])  # same tag in its name, another job
    running = UsageRecord(**{**_record("20").__dict__, "state": JobState.RUNNING, "raw_state": "RUNNING"})
    assert _import(env, [ours, forged, running]) == 1
    assert [r[0] for r in _imported(env)] == ["777777"]
    # a recycled scheduler id (state loss) long after the broker job is not the broker job
    recycled = _record(job["scheduler_job_id"], user="bob", submitted=datetime.now(UTC) + timedelta(days=30))
    assert _import(env, [recycled]) == 1


def test_job_awaiting_reconciliation_is_deferred_not_imported(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    env.setup_project(unit="gpu_hours", members=("alice", "bob"))
    from broker.auth import Authenticator
    from broker.schemas import JobRequest
    from broker.services.jobs import _reserve, mark_submit_failed

    principal = Authenticator(env.settings).authenticate(env.token("alice"))
    job, _, _ = _reserve(env.engine, env.settings, principal,
                         JobRequest(project="EHPC-TEST-001", script="true", time_limit_minutes=1), None)
    tagged = _record("555", user="alice", tag=job.id)
    assert _import(env, [tagged]) == 0  # the reconciler decides first: never charged twice
    mark_submit_failed(env.engine, job_id=job.id, reason="absent")
    assert _import(env, [tagged]) == 1  # not the broker's job after all: a direct job


def test_one_slurm_cluster_under_two_definitions_imports_each_job_once(quiet_env: BrokerEnv) -> None:
    """Issue 9: the same machine registered as -ssh and -rest charged each direct job twice."""
    env = quiet_env
    r = env.call("POST", "/v1/clusters", env.qm, json={
        "name": "local-twin", "adapter": "local", "connection": LOCAL_TEST_CONNECTION})
    assert r.status_code == 201, r.text
    with env.engine.begin() as conn:  # both definitions reach one scheduler
        conn.execute(sa.text("UPDATE clusters SET scheduler_identity = 'slurm:dev@ctl'"))
    env.setup_project(unit="gpu_hours", members=("alice", "bob"))
    r = env.call("POST", "/v1/projects/EHPC-TEST-001/allocations", env.qm, json={
        "cluster": "local-twin", "unit": "gpu_hours", "amount": 50, "account": "proj-a"})
    assert r.status_code == 201, r.text
    job = _submit(env, cluster="local")  # its scheduler id is recorded on "local"
    ours = _record(job["scheduler_job_id"], user="alice", submitted=datetime.fromisoformat(job["submitted_at"]))
    direct = [_record("9001"), _record("9002", global_id="sX")]
    assert _import(env, [*direct, ours], via="local") == 2
    assert _import(env, [*direct, ours], via="local-twin") == 0
    assert len(_import_ledger(env)) == 2
    # and the background importer takes each scheduler once, through its first definition
    seen: list[str] = []
    importer = env.app.state.tracker.importer
    original = importer.import_group
    importer.import_group = lambda c: seen.append(c.name) or original(c)  # type: ignore[method-assign]
    importer.run_cycle(force=True)
    assert seen == ["local"]
    # when that definition cannot read accounting, the next one of the scheduler does
    from broker.adapter import ClusterUnreachable

    def down(since: datetime, *, accounts: Any = None) -> list[UsageRecord]:
        raise ClusterUnreachable("slurmrestd down")

    adapter_for(env.app.state.registry, _cluster(env)).usage = down  # type: ignore[method-assign]
    seen.clear()
    importer.run_cycle(force=True)
    assert seen == ["local", "local-twin"]


def test_grant_refuses_a_slurm_account_shared_by_two_projects(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    env.setup_project("EHPC-A", account="shared")
    r = env.call("POST", "/v1/projects", env.qm, json={"code": "EHPC-B", "title": "B", "access_mode": "playground"})
    assert r.status_code == 201
    body = {"cluster": "local", "unit": "core_hours", "amount": 5, "account": "shared"}
    r = env.call("POST", "/v1/projects/EHPC-B/allocations", env.qm, json=body)
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    assert "EHPC-A" in r.json()["detail"] and "shared" in r.json()["detail"]
    # Slurm folds account names: written in another case it is the same account
    r = env.call("POST", "/v1/projects/EHPC-B/allocations", env.qm, json={**body, "account": "SHARED"})
    assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
    # the same project may hold several allocations on its account (e.g. a renewal)
    r = env.call("POST", "/v1/projects/EHPC-A/allocations", env.qm, json=body)
    assert r.status_code == 201, r.text
    # nor can an allocation be moved onto another project's account afterwards
    r = env.call("POST", "/v1/projects/EHPC-B/allocations", env.qm, json={**body, "account": "Own-B"})
    assert r.status_code == 201, r.text
    assert r.json()["account"] == "own-b"  # stored and answered as Slurm stores it
    r = env.call("PATCH", f"/v1/projects/EHPC-B/allocations/{r.json()['id']}", env.qm, json={"account": "shared"})
    assert r.status_code == 409 and "EHPC-A" in r.json()["detail"], r.text
    # a recycled account is fine once the other project's allocation has ended
    with env.engine.begin() as conn:
        conn.execute(sa.text("UPDATE allocations SET end_date = '2020-12-31' WHERE account = 'shared'"))
    r = env.call("POST", "/v1/projects/EHPC-B/allocations", env.qm, json={**body, "start_date": "2021-01-01"})
    assert r.status_code == 201, r.text


def test_attribution_by_account_and_membership() -> None:
    def alloc(i: int, project: int, account: str = "acct", end: str | None = None) -> Allocation:
        return Allocation(id=i, project_id=project, cluster_id=1, unit="core_hours", account=account,
                          end_date=datetime.fromisoformat(end).date() if end else None)

    rec = _record("1", account="acct")
    allocs = [alloc(1, 10), alloc(2, 20), alloc(3, 30, account="other")]
    assert attribute(allocs, rec, (5, {10})).id == 1  # the user's project, though not the newest
    assert attribute(allocs, rec, (5, {20})).id == 2
    assert attribute(allocs, rec, (None, set())).id == 2  # no member: the newest with the account
    assert attribute([alloc(1, 10), alloc(2, 10, end="2000-01-01")], rec, (5, {10})).id == 1  # valid first
    assert attribute([alloc(3, 30, account="other")], rec, (5, {30})) is None
    # an allocation stored before account names were lower-cased is still the record's
    assert attribute([alloc(4, 40, account="ACCT")], rec, (5, {40})).id == 4


def test_a_job_that_used_nothing_writes_no_ledger_entry(quiet_env: BrokerEnv) -> None:
    env = quiet_env
    env.setup_project(unit="gpu_hours", members=("alice", "bob"))
    assert _import(env, [_record("30", tres={"cpu": 1}), _record("31", elapsed=0)]) == 0
    assert [r[0] for r in _imported(env)] == ["30", "31"]  # recorded: never looked at again
    assert _import_ledger(env) == []
    assert _import(env, [_record("30", tres={"cpu": 1})]) == 0


def test_import_is_incremental_and_bounded(db_url: str, tmp_path: Path) -> None:
    with broker_env(tmp_path, db_url, run_tracker=False, usage_import_batch=2,
                    usage_import_overlap_minutes=1) as env:
        env.setup_project(unit="gpu_hours", members=("alice", "bob"))
        base = datetime.now(UTC) - timedelta(hours=3)
        records = [_record(str(100 + i), submitted=base + timedelta(minutes=10 * i)) for i in range(5)]
        calls: list[datetime] = []
        adapter = adapter_for(env.app.state.registry, _cluster(env))

        def usage(since: datetime, *, accounts: Any = None) -> list[UsageRecord]:
            calls.append(since)
            return [r for r in records if r.end_time >= since]

        adapter.usage = usage  # type: ignore[method-assign]
        importer = env.app.state.tracker.importer
        counts = [importer.run_cycle(force=True) for _ in range(6)]
        # at most 2 new records a cycle (the re-read overlap is checked on top, never charged again)
        assert counts == [2, 2, 1, 0, 0, 0]
        assert len(_imported(env)) == 5 and len(_import_ledger(env)) == 5
        # each cycle asks only from the last imported end (minus the overlap)
        assert calls[0] < calls[1] < calls[2] < calls[3] == calls[4] == calls[5]
        assert calls[1] == records[1].end_time - timedelta(minutes=1)
        assert _cluster(env).usage_imported_until == records[4].end_time


def test_a_busy_overlap_window_never_stalls_the_import(db_url: str, tmp_path: Path) -> None:
    """More records inside the overlap than one batch (a busy cluster: 3,900 jobs an hour
    on the dev cluster) must not make every cycle re-read the same already-imported batch."""
    with broker_env(tmp_path, db_url, run_tracker=False, usage_import_batch=2,
                    usage_import_overlap_minutes=60) as env:
        env.setup_project(unit="gpu_hours", members=("alice", "bob"))
        base = datetime.now(UTC) - timedelta(hours=2)
        records = [_record(str(200 + i), submitted=base + timedelta(minutes=i)) for i in range(10)]
        adapter = adapter_for(env.app.state.registry, _cluster(env))
        adapter.usage = lambda since, *, accounts=None: [r for r in records if r.end_time >= since]  # type: ignore[method-assign]
        counts = [env.app.state.tracker.importer.run_cycle(force=True) for _ in range(6)]
        assert counts == [2, 2, 2, 2, 2, 0] and len(_import_ledger(env)) == 10


def test_slow_import_never_delays_polling(env: BrokerEnv) -> None:
    """Issue 14: the import runs on its own thread; a 60 s accounting query must not
    hold back the settlement of a job (polling every 0.2 s). The job may take a while
    on a loaded CI host; what matters is that it settles while the import still runs."""
    env.setup_project()
    adapter = adapter_for(env.app.state.registry, _cluster(env))
    started, release = threading.Event(), threading.Event()

    def slow_usage(since: datetime, *, accounts: Any = None) -> list[UsageRecord]:
        started.set()
        release.wait(60)
        return []

    adapter.usage = slow_usage  # type: ignore[method-assign]
    importing = threading.Thread(target=env.app.state.tracker.importer.run_cycle, kwargs={"force": True},
                                 daemon=True)
    try:
        assert env.app.state.tracker.importer._thread is not None
        importing.start()
        assert started.wait(10), "the import never started"
        t0 = time.monotonic()
        job = _submit(env)
        done = env.wait_settled(job["id"], env.auth("alice"), timeout=40)
        assert done["state"] == "COMPLETED" and time.monotonic() - t0 < 40
        assert not release.is_set() and importing.is_alive()  # the import was still running all along
    finally:
        release.set()
        importing.join(10)


# ----------------------------------------------------------------------------- busy accounting windows


class BusyAccounting:
    """A scheduler's accounting that cannot answer more than ``cap`` records at once
    (like ``sacct`` past ``max_output_bytes``: ``OutputTooLarge``) and records every
    window asked for. Windows include their start, like ``sacct``, so neighbouring
    windows overlap by the records ending exactly on their border."""

    def __init__(self, records: list[UsageRecord], cap: int) -> None:
        self.records = records
        self.cap = cap
        self.calls: list[tuple[datetime, datetime | None, str]] = []
        #: the accounts each call asked for
        self.accounts: list[tuple[str, ...]] = []
        #: (since, until) -> an error to raise instead of answering
        self.fail: Callable[[datetime, datetime | None], AdapterError | None] = lambda since, until: None
        #: windows streamed (``iter_usage``): (since, until, accounts)
        self.streams: list[tuple[datetime, datetime | None, tuple[str, ...]]] = []
        self.broken_after: int | None = None
        self.yielded = 0
        #: called with the number of records streamed so far, before each is handed over
        self.watch: Callable[[int], None] | None = None

    def usage(self, since: datetime, *, accounts: Any = None, until: datetime | None = None) -> list[UsageRecord]:
        error = self.fail(since, until)
        found = [r for r in self.records if r.end_time and r.end_time >= since
                 and (until is None or r.end_time <= until) and (not accounts or r.account in accounts)]
        if error is None and len(found) > self.cap:
            error = OutputTooLarge(f"{len(found)} records")
        self.calls.append((since, until, "ok" if error is None else error.code))
        self.accounts.append(tuple(accounts or ()))
        if error is not None:
            raise error
        return found

    def iter_usage(self, since: datetime, *, accounts: Any = None,
                   until: datetime | None = None) -> Iterator[UsageRecord]:
        """The window's records one at a time, without the cap, in job-id order
        (not end-time order, like ``sacct``'s); ``broken_after`` records then a drop."""
        self.streams.append((since, until, tuple(accounts or ())))
        for i, record in enumerate(sorted((r for r in self.records if r.end_time and r.end_time >= since
                                           and (until is None or r.end_time <= until)
                                           and (not accounts or r.account in accounts)),
                                          key=lambda r: int(r.job_id))):
            if self.broken_after is not None and i == self.broken_after:
                raise ClusterUnreachable("connection dropped mid-answer")
            self.yielded += 1
            if self.watch is not None:
                self.watch(self.yielded)
            yield record


def _busy_env(tmp_path: Path, db_url: str, records: list[UsageRecord], cap: int,
              **settings: Any) -> Iterator[tuple[BrokerEnv, BusyAccounting]]:
    with broker_env(tmp_path, db_url, run_tracker=False, **settings) as env:
        env.setup_project(unit="gpu_hours", amount=10_000, members=("alice", "bob"))
        fake = BusyAccounting(records, cap)
        adapter_for(env.app.state.registry, _cluster(env)).usage = fake.usage  # type: ignore[method-assign]
        yield env, fake


busy_env = contextlib.contextmanager(_busy_env)


def _spread(count: int, *, hours: float = 10, first: int = 1000) -> list[UsageRecord]:
    """``count`` direct jobs of 10 minutes ending evenly over the last ``hours`` (the last
    one 5 minutes ago); every fifth ends at the same second as the one before it."""
    now = datetime.now(UTC).replace(microsecond=0)
    step = timedelta(hours=hours) / count
    records = []
    for i in range(count):
        end = now - timedelta(minutes=5) - step * (count - 1 - (i - (i % 5 == 4)))
        records.append(_record(str(first + i), submitted=end - timedelta(minutes=10), elapsed=600))
    return records


def _charges(env: BrokerEnv) -> dict[str, int]:
    """scheduler job id -> how many import ledger entries charged it."""
    with env.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT i.scheduler_job_id, COUNT(l.id) FROM imported_jobs i "
                                    "LEFT JOIN ledger_entries l ON l.imported_job_id = i.id AND l.kind = 'import' "
                                    "GROUP BY i.scheduler_job_id")).all()
    return {str(job): int(n) for job, n in rows}


def _cycles(env: BrokerEnv, fake: BusyAccounting, limit: int = 20) -> list[tuple[int, list[tuple]]]:
    """Import cycles until two in a row import nothing: (count, the calls it made) each."""
    importer = env.app.state.tracker.importer
    done: list[tuple[int, list[tuple]]] = []
    for _ in range(limit):
        before = len(fake.calls)
        done.append((importer.run_cycle(force=True), fake.calls[before:]))
        if len(done) >= 2 and done[-1][0] == done[-2][0] == 0:
            return done
    raise AssertionError(f"the import never settled: {[c for c, _ in done]}")


def _assert_windows_in_end_order(calls: list[tuple]) -> None:
    """Within one cycle the windows read succeed oldest first, each starting where the last ended."""
    read = [(since, until) for since, until, outcome in calls if outcome == "ok"]
    for (_, until), (since, _) in itertools.pairwise(read):
        assert until is not None and since == until


def test_a_window_too_large_to_read_is_split_and_each_job_charged_once(db_url: str, tmp_path: Path) -> None:
    """A first import whose whole 48 h window is too large for one read (more than 8 records
    here, ~50,000 for sacct's 16 MiB) is read in halves until the pieces fit: each job is
    charged exactly once and the watermark ends at the last job's end."""
    records = _spread(60)
    with busy_env(tmp_path, db_url, records, cap=8, usage_import_max_span_hours=48,
                  usage_import_batch=1000) as (env, fake):
        cycles = _cycles(env, fake)
        assert cycles[0][0] == 60, "the first cycle imports everything, in pieces"
        first_calls = cycles[0][1]
        assert any(outcome == "output_too_large" for *_, outcome in first_calls)
        assert len(first_calls) < 80, "splitting is bounded"
        _assert_windows_in_end_order(first_calls)
        assert _charges(env) == {r.job_id: 1 for r in records}
        assert len(_import_ledger(env)) == 60
        assert _cluster(env).usage_imported_until == max(r.end_time for r in records if r.end_time)
        # later cycles re-read the overlap (several pieces: the span learnt) and charge nothing again
        assert all(count == 0 for count, _ in cycles[1:])
        assert all(outcome == "ok" for _, calls in cycles[1:] for *_, outcome in calls)


def test_busy_windows_with_a_small_batch_move_the_watermark_only_over_what_was_imported(
        db_url: str, tmp_path: Path) -> None:
    records = _spread(40, hours=6)
    with busy_env(tmp_path, db_url, records, cap=8, usage_import_max_span_hours=48,
                  usage_import_batch=5, usage_import_overlap_minutes=1) as (env, _):
        importer = env.app.state.tracker.importer
        ends = sorted(r.end_time for r in records if r.end_time)
        marks: list[datetime] = []
        counts: list[int] = []
        for _ in range(30):
            counts.append(importer.run_cycle(force=True))
            mark = _cluster(env).usage_imported_until
            assert mark is not None and mark in ends, "the watermark is the end of a job imported"
            imported = set(_charges(env))
            # every job ending at or before the watermark is imported: nothing skipped
            assert {r.job_id for r in records if r.end_time and r.end_time <= mark} <= imported
            marks.append(mark)
            if counts[-1] == 0:
                break
        assert all(c <= 5 for c in counts) and sum(counts) == 40
        assert marks == sorted(marks) and marks[-1] == ends[-1]
        assert _charges(env) == {r.job_id: 1 for r in records}


def test_a_read_failing_after_others_keeps_what_they_imported(db_url: str, tmp_path: Path) -> None:
    """Windows read before a failing one are imported and the watermark covers them only;
    the next cycle goes on from there."""
    records = _spread(30, hours=6)
    middle = sorted(r.end_time for r in records if r.end_time)[14]
    with busy_env(tmp_path, db_url, records, cap=100, usage_import_max_span_hours=1) as (env, fake):
        fake.fail = lambda since, until: ClusterUnreachable("slurmdbd down") if until is None or until > middle else None
        importer = env.app.state.tracker.importer
        first = importer.run_cycle(force=True)
        mark = _cluster(env).usage_imported_until
        assert 0 < first < 30 and mark is not None and mark <= middle
        assert set(_charges(env)) == {r.job_id for r in records if r.end_time and r.end_time <= mark}
        fake.fail = lambda since, until: None
        assert first + importer.run_cycle(force=True) == 30
        assert _charges(env) == {r.job_id: 1 for r in records}


def test_too_large_even_at_the_narrowest_window_stops_without_skipping(
        db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Twelve jobs ending in the same second, eight at most per read: no window can be
    narrow enough. The import stops there (an error says what helps), skips nothing,
    and asks a bounded number of times."""
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    records = [_record(str(500 + i), submitted=end - timedelta(minutes=10), elapsed=600) for i in range(12)]
    with busy_env(tmp_path, db_url, records, cap=8, usage_import_max_span_hours=48) as (env, fake):
        importer = env.app.state.tracker.importer
        assert importer.run_cycle(force=True) == 0
        # about two reads per halving from 48 h to a minute (12 of them), and per doubling back
        assert 0 < len(fake.calls) <= 40
        narrowest = min((until or datetime.now(UTC)) - since for since, until, _ in fake.calls)
        assert narrowest <= timedelta(minutes=2)
        assert _charges(env) == {} and _cluster(env).usage_imported_until is None
        assert "raise the adapter's output cap" in caplog.text
        stuck = _scrape(env)["aifa_usage_import_stuck_total"][(("cluster", "local"),)]
        before = len(fake.calls)
        assert importer.run_cycle(force=True) == 0  # and so every cycle, never skipping the jobs
        assert 0 < len(fake.calls) - before <= 40 and _charges(env) == {}
        assert _scrape(env)["aifa_usage_import_stuck_total"][(("cluster", "local"),)] == stuck + 1


def test_one_accounts_burst_too_large_for_any_answer_is_streamed_once(
        db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Six hundred jobs of one account ending in the same second, eight at most per
    answer: no window and no account split can be small enough. The adapter streams
    the narrowest window; every job is charged once, a broker job among them not at
    all, the watermark moves past the burst, and at most a commit's worth of the
    stream is held at a time."""
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    records = [_record(str(5000 + i), submitted=end - timedelta(minutes=10), elapsed=600) for i in range(600)]
    later = [_record("9000", submitted=end, elapsed=600)]  # after the burst: reached in the same cycle
    with busy_env(tmp_path, db_url, records + later, cap=8, usage_import_max_span_hours=48) as (env, fake):
        job = _submit(env)  # a broker job whose accounting record ends in the burst
        assert job["scheduler_job_id"]
        ours = _record(job["scheduler_job_id"], user="alice", tag=job["id"],
                       submitted=datetime.fromisoformat(job["submitted_at"]))
        ours = UsageRecord(**{**ours.__dict__, "end_time": end})
        fake.records.append(ours)
        adapter_for(env.app.state.registry, _cluster(env)).iter_usage = fake.iter_usage  # type: ignore[method-assign]
        held: list[int] = []
        fake.watch = lambda n: held.append(n - sum(1 for _ in _imported(env)))
        importer = env.app.state.tracker.importer
        caplog.set_level(logging.INFO, logger="broker.usage_import")
        streamed = _streamed(env)
        assert importer.run_cycle(force=True) == 601
        assert _charges(env) == {r.job_id: 1 for r in records + later}
        assert job["scheduler_job_id"] not in _charges(env), "a broker job is not direct usage"
        assert [accounts for *_, accounts in fake.streams] == [("proj-a",)]
        since, until, _ = fake.streams[0]
        assert until is not None and until - since <= timedelta(minutes=1) and since < end <= until
        assert "streaming it" in caplog.text and "stuck" not in caplog.text
        assert max(held) <= 200 + 1, "the importer holds one commit's worth of the stream"
        assert _cluster(env).usage_imported_until == later[0].end_time
        assert _streamed(env) == streamed + 1, "one window streamed, counted"
        # the next cycle re-reads the overlap before the watermark, the burst streamed again: nothing charged twice
        assert importer.run_cycle(force=True) == 0 and len(_import_ledger(env)) == 601


def _streamed(env: BrokerEnv) -> float:
    return float(_scrape(env).get("aifa_usage_import_streamed_total", {}).get((("cluster", "local"),), 0))


def test_a_stream_dropped_midway_is_read_again_without_charging_twice(db_url: str, tmp_path: Path) -> None:
    """The connection drops after 450 of 600 streamed records: what was imported stays,
    the watermark stays before the window, the next cycle streams it again and charges
    only the rest."""
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    records = [_record(str(5000 + i), submitted=end - timedelta(minutes=10), elapsed=600) for i in range(600)]
    with busy_env(tmp_path, db_url, records, cap=8, usage_import_max_span_hours=48) as (env, fake):
        adapter_for(env.app.state.registry, _cluster(env)).iter_usage = fake.iter_usage  # type: ignore[method-assign]
        fake.broken_after = 450
        importer = env.app.state.tracker.importer
        assert importer.run_cycle(force=True) == 400  # imported, but the window is unfinished
        first = len(_charges(env))
        assert first == 400 and all(n == 1 for n in _charges(env).values())
        mark = _cluster(env).usage_imported_until
        assert mark is None or mark < end
        fake.broken_after = None
        assert importer.run_cycle(force=True) == 200
        assert _charges(env) == {r.job_id: 1 for r in records}
        assert _cluster(env).usage_imported_until == end


def test_too_large_at_the_narrowest_window_is_read_per_account(
        db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Twelve jobs of two accounts ending in the same second, eight at most per read:
    no window is narrow enough for both, but each account's six fit. The import reads
    the narrowest window per account, charges every job once and moves on."""
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    records = [_record(str(500 + i), submitted=end - timedelta(minutes=10), elapsed=600,
                       account="proj-a" if i % 2 else "proj-b") for i in range(12)]
    later = [_record("600", submitted=end, elapsed=600)]  # after the burst: reached in the same cycle
    with busy_env(tmp_path, db_url, records + later, cap=8, usage_import_max_span_hours=48) as (env, fake):
        env.setup_project("EHPC-TEST-002", unit="gpu_hours", amount=10_000, members=("bob",), account="proj-b")
        importer = env.app.state.tracker.importer
        caplog.set_level(logging.INFO, logger="broker.usage_import")
        assert importer.run_cycle(force=True) == 13
        assert _charges(env) == {r.job_id: 1 for r in records + later}
        assert ("proj-a",) in fake.accounts and ("proj-b",) in fake.accounts
        assert "too large for 2 accounts" in caplog.text and "stuck" not in caplog.text
        assert _cluster(env).usage_imported_until == later[0].end_time
        assert importer.run_cycle(force=True) == 0 and len(_import_ledger(env)) == 13
        # measurable: the splits are counted, and the watermark's age is exported
        metrics = _scrape(env)
        assert metrics["aifa_usage_import_account_splits_total"][(("cluster", "local"),)] >= 1
        lag = metrics["aifa_usage_import_lag_seconds"][(("cluster", "local"),)]
        assert 3 * 3600 - 600 - 5 <= lag <= 3 * 3600 - 600 + 120  # the last job ended 2 h 50 min ago


def test_an_adapter_without_until_is_read_in_one_call(db_url: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A plugin written before ``until`` existed keeps working (one read per cycle, as
    before); a window too large for it postpones the import and says why."""
    records = _spread(12, hours=3)
    with busy_env(tmp_path, db_url, records, cap=8) as (env, fake):
        adapter = adapter_for(env.app.state.registry, _cluster(env))
        calls: list[datetime] = []

        def old_usage(since: datetime, *, accounts: Any = None) -> list[UsageRecord]:
            calls.append(since)
            return fake.usage(since, accounts=accounts)

        adapter.usage = old_usage  # type: ignore[method-assign]
        assert not usage_accepts_until(adapter)
        importer = env.app.state.tracker.importer
        assert importer.run_cycle(force=True) == 0 and len(calls) == 1
        assert "takes no `until`" in caplog.text
        fake.cap = 100
        assert importer.run_cycle(force=True) == 12 and len(calls) == 2
        assert _charges(env) == {r.job_id: 1 for r in records}


def test_a_read_timing_out_is_halved_once_a_cycle(db_url: str, tmp_path: Path) -> None:
    """slurmrestd builds its whole answer before sending it: a busy window can time out
    instead of being too large. Such a window is halved once per cycle (a hung daemon
    must not be asked a dozen times a cycle), and the narrower span is kept."""
    records = _spread(10, hours=5)
    with busy_env(tmp_path, db_url, records, cap=100, usage_import_max_span_hours=48) as (env, fake):
        fake.fail = lambda since, until: (ClusterUnreachable("read timed out", code="command_timeout")
                                          if (until or datetime.now(UTC)) - since > timedelta(hours=7) else None)
        counts, timeouts = [], []
        importer = env.app.state.tracker.importer
        for _ in range(6):
            before = len(fake.calls)
            counts.append(importer.run_cycle(force=True))
            timeouts.append(sum(outcome == "command_timeout" for *_, outcome in fake.calls[before:]))
        assert max(timeouts) <= 2, "at most the first read and its half time out in one cycle"
        assert counts[:2] == [0, 0] and sum(counts) == 10  # 48 h -> 24 h, 24 h -> 12 h, then 6 h reads
        assert _charges(env) == {r.job_id: 1 for r in records}


class _KeywordUntil:
    def usage(self, since: datetime, *, accounts: Any = None, until: datetime | None = None) -> list[UsageRecord]:
        return []


class _PositionalUntil:
    def usage(self, since: datetime, accounts: Any = None, until: datetime | None = None) -> list[UsageRecord]:
        return []


class _AnyKeyword:
    def usage(self, since: datetime, **kwargs: Any) -> list[UsageRecord]:
        return []


class _Before:  # written before ``until`` existed
    def usage(self, since: datetime, *, accounts: Any = None) -> list[UsageRecord]:
        return []


class _OnlyPositional:
    def usage(self, since: datetime, *args: Any) -> list[UsageRecord]:
        return []


@pytest.mark.parametrize(("plugin", "accepted"), [
    (_KeywordUntil, True), (_PositionalUntil, True), (_AnyKeyword, True), (_Before, False), (_OnlyPositional, False),
])
def test_usage_accepts_until_is_told_from_the_signature(plugin: type, accepted: bool) -> None:
    assert usage_accepts_until(plugin()) is accepted
