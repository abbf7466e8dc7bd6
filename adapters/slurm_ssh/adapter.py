"""The ``slurm_ssh`` adapter: Slurm's command line over pooled SSH connections.

Which account runs what:

- ``submit``, ``cancel``, ``read_output`` run as the job's own POSIX user
  (``auth = "certificate"``), or as ``service_username`` (``auth = "key"``).
- Cluster-wide reads (``squeue``, ``sacct --allusers``, ``scontrol``, health)
  run as ``query_username``. ``poll`` falls back to the first ref's user when it
  is not set; ``usage``, ``find_by_tag`` and ``discover`` require it (or the
  service account). Slurm's ``PrivateData`` is off by default, so any user sees
  every job; a site that sets it must give ``query_username`` operator rights.

Scheduler calls per operation: ``poll`` = one ``squeue`` (a ``|``-separated line
per job, not ``--json``: 22.05 ignores filters with ``--json``, and JSON is 25-60
times bigger to send and parse; ``--jobs`` for a few jobs, else the whole queue,
which is cheaper than squeue's filter) + at most one ``sacct -P`` for the jobs that left
the queue (text, not JSON: 22.05's JSON reports exit code 0 for failed jobs);
``find_by_tag`` = one ``squeue`` + one ``sacct``; ``usage`` = one ``sacct``. The
release comes from ``sinfo --version`` once per adapter (``slurm_release`` is
only a fallback).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import paramiko

from adapters.slurm_common.accounting import (
    SACCT_PARSABLE_FIELDS,
    SACCT_PARSABLE_FIELDS_SLUID,
    AccountingJob,
    MalformedRecord,
)
from adapters.slurm_common.arrays import task_key
from adapters.slurm_common.identity import slurm_identity
from adapters.slurm_common.queue import QueueJob
from adapters.slurm_common.shapes import now_utc
from adapters.slurm_common.states import started_or_expected
from adapters.slurm_common.tags import tag_from_job_name
from adapters.slurm_common.window import relative_window
from adapters.slurm_ssh import commands, errors, parse
from adapters.slurm_ssh.certs import CertificateAuthority, load_private_key
from adapters.slurm_ssh.sacctmgr import SacctmgrManager
from adapters.slurm_ssh.settings import SSHSettings
from adapters.slurm_ssh.transport import NO_EXIT_STATUS, CommandResult, SSHPool
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterAdapter,
    Health,
    JobSpec,
    JobStatus,
    PartitionInfo,
    SchedulerJobRef,
    StartEstimate,
    SubmitOutcomeUnknown,
    UsageRecord,
)
from broker.states import JobState

__all__ = ["SlurmSSHAdapter"]

log = logging.getLogger(__name__)

#: First release whose accounting has globally unique job ids (``SLUID``).
SLUID_RELEASE = (26, 5)
#: clock slack of find_by_tag's accounting look-back
_FIND_SLACK_SECONDS = 300


class SlurmSSHAdapter(ClusterAdapter):
    """Slurm through ``sbatch``/``squeue``/``sacct``/``scancel`` over SSH."""

    def __init__(self, name: str, settings: Any, *, data_dir: str) -> None:
        super().__init__(name, settings, data_dir=data_dir)
        self.config = SSHSettings.from_mapping(self.settings)
        self._service_key: paramiko.PKey | None = None
        self._ca: CertificateAuthority | None = None
        if self.config.auth == "certificate" and self.config.ssh_ca_key_file:
            self._ca = CertificateAuthority(
                self.config.ssh_ca_key_file,
                self.config.certificate_validity_seconds,
                self.config.certificate_backdate_seconds,
            )
        self._lock = threading.Lock()
        self._pool = SSHPool(self.config, self._identity)
        self._release: tuple[int, int] | None = None
        self._calls = 0
        self._accounting: SacctmgrManager | None = None

    # ------------------------------------------------------------- identity

    def _identity(self, login: str) -> paramiko.PKey:
        if self._ca is not None:
            return self._ca.issue(login)
        with self._lock:
            if self._service_key is None:
                if not self.config.key_file:
                    raise AdapterConfigError("slurm_ssh: no key_file configured")
                self._service_key = load_private_key(self.config.key_file)
            return self._service_key

    def _query_user(self, refs: Sequence[SchedulerJobRef] = ()) -> str:
        user = self.config.query_username or self.config.service_username
        if user:
            return user
        if refs:
            return refs[0].username
        raise AdapterConfigError(
            f"cluster {self.name}: set connection.query_username for cluster-wide queries",
            code="no_query_username",
        )

    # ------------------------------------------------------------- plumbing

    def scheduler_calls(self) -> int:
        """How many Slurm commands (not ``sinfo --version``) this adapter ran."""
        with self._lock:
            return self._calls

    def _run(self, user: str, command: str, **kwargs: Any) -> CommandResult:
        with self._lock:
            self._calls += 1
        return self._pool.run(user, command, **kwargs)

    def _slurm_release(self, user: str) -> tuple[int, int] | None:
        with self._lock:
            if self._release is not None:
                return self._release
        try:
            result = self._pool.run(user, commands.build_version())
            release = parse.parse_version(result.stdout) if result.ok else None
        except (AdapterError, ValueError) as exc:
            log.warning("cluster %s: sinfo --version failed: %s", self.name, exc)
            release = None
        if release is None and self.config.slurm_release:
            try:
                release = parse.parse_version(self.config.slurm_release)
            except ValueError:
                release = None
        if release is not None:
            with self._lock:
                self._release = release
        return release

    def _usage_fields(self, user: str) -> tuple[str, ...]:
        """sacct fields for usage import: with ``SLUID`` where the release has it (26.05+)."""
        release = self._slurm_release(user)
        return SACCT_PARSABLE_FIELDS_SLUID if release is not None and release >= SLUID_RELEASE \
            else SACCT_PARSABLE_FIELDS

    def _query(self, user: str, command: str, what: str) -> str:
        result = self._run(user, command)
        if not result.ok:
            raise errors.query_failure(what, result.exit_status, result.stderr)
        return result.stdout

    # ----------------------------------------------------------- accounting

    def accounting(self) -> SacctmgrManager:
        """``sacctmgr`` as ``admin_username`` (reads fall back to ``query_username``)."""
        with self._lock:
            if self._accounting is None:
                self._accounting = SacctmgrManager(
                    cluster=self.name, run=self._run, admin_username=self.config.admin_username,
                    reader=self.config.query_username or self.config.service_username)
            return self._accounting

    # --------------------------------------------------------------- submit

    def submit(self, spec: JobSpec) -> SchedulerJobRef:
        """``sbatch --parsable`` as ``spec.username``, script on stdin."""
        cmd = commands.build_submit(spec, self.config.output_dir)
        submitted_at = now_utc()
        result = self._run(spec.username, cmd.command, stdin=cmd.stdin, idempotent=False)
        if not result.ok:
            raise errors.submit_failure(result.exit_status, result.stderr)
        try:
            job_id = parse.parse_sbatch_job_id(result.stdout)
        except ValueError as exc:
            raise SubmitOutcomeUnknown(f"sbatch succeeded without a job id: {exc}") from exc
        log.info(
            "cluster %s: submitted %s as job %s (%.0f ms)",
            self.name,
            spec.tag,
            job_id,
            result.seconds * 1000,
        )
        return SchedulerJobRef(
            job_id=job_id, username=spec.username, tag=spec.tag, submit_time=submitted_at
        )

    def expected_start(self, spec: JobSpec) -> StartEstimate:
        """``sbatch --test-only`` as ``spec.username``: the scheduler's own forecast
        (backfill over the running jobs' time limits); nothing is submitted."""
        cmd = commands.build_test_only(spec, self.config.output_dir)
        result = self._run(spec.username, cmd.command, stdin=cmd.stdin)
        if not result.ok:
            raise errors.submit_failure(result.exit_status, result.stderr)
        detail = errors.slurm_message(result.stderr, "sbatch --test-only gave no answer")
        return StartEstimate(parse.parse_test_only(result.stderr), "test-only", detail)

    # ----------------------------------------------------------------- poll

    def poll(self, refs: Sequence[SchedulerJobRef]) -> list[JobStatus]:
        """One ``squeue`` + at most one ``sacct`` for every ref together. An array
        ref (``array_tasks``) is answered per task (``<id>_<task>``)."""
        valid = [r for r in refs if commands.JOB_ID_RE.match(r.job_id or "") and "_" not in r.job_id]
        if not valid:
            return []
        user = self._query_user(valid)
        queue = self._queue_jobs(user, {r.job_id for r in valid})
        statuses: dict[str, JobStatus] = {}
        left = []
        for ref in valid:
            if ref.array_tasks is not None:
                missing = []
                for task in ref.array_tasks:
                    key = task_key(ref.job_id, task)
                    job = queue.get(key)
                    if job is not None and not job.terminal:
                        statuses[key] = replace(_status_from_queue(job), job_id=key, array_task_id=task)
                    else:
                        missing.append(task)
                if missing:
                    left.append(replace(ref, array_tasks=tuple(missing)))
                continue
            job = queue.get(ref.job_id)
            if job is not None and not job.terminal:
                statuses[ref.job_id] = _status_from_queue(job)
            else:
                left.append(ref)
        if left:
            statuses.update(self._accounted(user, left, queue))
        return list(statuses.values())

    def _queue_jobs(self, user: str, wanted: set[str]) -> dict[str, QueueJob]:
        """Queue records by job id, array tasks by ``<array id>_<task>`` (the record
        of an array's pending tasks stands for each of them)."""
        mark = secrets.token_hex(8)  # new each poll: no text in the queue can hold it
        result = self._run(user, commands.build_squeue_poll(sorted(wanted, key=int), mark))
        if not result.ok:
            if "invalid job id" in result.stderr.lower():
                return {}
            raise errors.query_failure("squeue", result.exit_status, result.stderr)
        try:  # nothing readable is never "every job left the queue"
            jobs, _ = parse.parse_squeue_poll(result.stdout, mark, wanted)
        except ValueError as exc:
            raise AdapterError(str(exc), code="scheduler_output_invalid", transient=True) from exc
        found: dict[str, QueueJob] = {}
        twice: set[str] = set()
        for j in jobs:
            if j.array is not None:
                keys = [key for key, _ in j.array.keys] if j.array.array_job_id in wanted else []
            else:
                keys = [j.job_id] if j.job_id in wanted else []
            twice.update(k for k in keys if k in found)
            found.update(dict.fromkeys(keys, j))
        for key in twice:  # two records of one job: neither is trusted, accounting decides
            log.warning("cluster %s: squeue shows job %s twice; asking accounting", self.name, key)
            del found[key]
        return found

    def _accounted(
        self, user: str, refs: Sequence[SchedulerJobRef], queue: dict[str, QueueJob]
    ) -> dict[str, JobStatus]:
        ids = sorted({r.job_id for r in refs}, key=int)
        try:
            text = self._query(user, commands.build_sacct_jobs(ids), "sacct")
            records, _ = parse.parse_sacct_parsable(text)
        except AdapterError as exc:
            log.warning("cluster %s: sacct failed, ended jobs stay unconfirmed: %s", self.name, exc)
            records = []
        by_id: dict[str, list[AccountingJob]] = {}
        for record in records:
            if record.array is not None:
                for key, _ in record.array.keys:
                    by_id.setdefault(key, []).append(record)
            else:
                by_id.setdefault(record.job_id, []).append(record)
        now = now_utc()
        out: dict[str, JobStatus] = {}
        for ref in refs:
            keys = ([(task_key(ref.job_id, t), t) for t in ref.array_tasks] if ref.array_tasks is not None
                    else [(ref.job_id, None)])
            for key, task in keys:
                picked = _pick(by_id.get(key, []), ref)
                status = self._status_after_queue(picked, queue.get(key), now)
                if status is not None:
                    out[key] = status if task is None else replace(status, job_id=key, array_task_id=task)
        return out

    def _status_after_queue(
        self, rec: AccountingJob | None, job: QueueJob | None, now: datetime
    ) -> JobStatus | None:
        if rec is not None and rec.is_settled(now, self.config.accounting_lag_seconds):
            return _status_from_accounting(rec, final=True)
        if rec is not None and not rec.terminal and not rec.placeholder:
            return _status_from_accounting(rec, final=False)
        if rec is None and job is None:
            return None
        raw = rec.raw_state if rec is not None else (job.raw_state if job else "UNKNOWN")
        job_id = rec.job_id if rec is not None else (job.job_id if job else "")
        tag = (rec.tag if rec is not None else None) or (job.tag if job else None)
        return JobStatus(
            job_id=job_id,
            state=JobState.COMPLETING,
            raw_state=raw,
            final=False,
            reason="waiting for accounting",
            tag=tag,
        )

    # --------------------------------------------------------------- cancel

    def cancel(self, ref: SchedulerJobRef) -> None:
        """``scancel`` as the job's user; a finished or unknown job is fine."""
        command = commands.build_cancel(_job_id(ref))
        result = self._run(ref.username, command)
        if result.exit_status == NO_EXIT_STATUS:
            # the channel closed without an exit status (scancel died of a signal after its
            # RPC: seen on a loaded 22.05 host); scancel is idempotent, so ask once more
            log.info("cluster %s: scancel %s gave no exit status; asking again", self.name, ref.job_id)
            result = self._run(ref.username, command)
        if result.ok:
            return
        error = errors.cancel_failure(result.exit_status, result.stderr)
        if error is not None:
            raise error

    # ---------------------------------------------------------- find_by_tag

    def find_by_tag(
        self, tags: Sequence[str], *, since: datetime | None = None, accounts: Sequence[str] | None = None
    ) -> dict[str, SchedulerJobRef]:
        """Jobs whose **name** carries a tag (comments may not be stored), from
        the queue and from accounting since ``since`` (default
        ``find_by_tag_days``), both read for ``accounts`` only when given
        (``squeue --account``, ``sacct --accounts``). With duplicates the first
        submitted job wins."""
        wanted = {t for t in tags if t}
        if not wanted:
            return {}
        user = self._query_user()
        now = now_utc()
        start = since or now - timedelta(days=self.config.find_by_tag_days)
        seconds = int((now - start).total_seconds()) + _FIND_SLACK_SECONDS
        queue = parse.parse_queue_text(self._query(user, commands.build_find_queue(accounts), "squeue"))
        acct, _ = parse.parse_sacct_parsable(
            self._query(user, commands.build_sacct_window(seconds, accounts=accounts), "sacct")
        )
        candidates: Iterable[tuple[str, str, datetime | None, str | None, str | None]] = [
            *((q.job_id, q.user, q.submit_time, q.name, q.account) for q in queue),
            *((a.array.array_job_id if a.array else a.job_id, a.user or "", a.submit_time, a.name, a.account)
              for a in acct),
        ]
        return _first_per_tag(candidates, wanted)

    # ---------------------------------------------------------------- usage

    def usage(self, since: datetime, *, accounts: Sequence[str] | None = None,
              until: datetime | None = None) -> list[UsageRecord]:
        """Every finished job (any submitter) of ``accounts`` that ended after
        ``since`` (and not after ``until``), from one ``sacct --allusers -X -P
        --state=<end states> --starttime --endtime``: with end states given, sacct
        selects by end time, so ``until`` bounds the output. The window is widened by
        ``usage_clock_margin_seconds`` for the login node's clock
        (:mod:`adapters.slurm_common.window`) and the records filtered here by their
        end time. Malformed rows and not-yet-settled records are skipped; an output
        past ``max_output_bytes`` raises ``OutputTooLarge``."""
        if until is not None and until <= since:
            return []
        user, command, fields, now = self._usage_command(since, accounts, until)
        jobs, skipped = parse.parse_sacct_parsable(self._query(user, command, "sacct"), fields)
        return list(self._usage_records(jobs, since, until, now, skipped))

    def iter_usage(self, since: datetime, *, accounts: Sequence[str] | None = None,
                   until: datetime | None = None) -> Iterator[UsageRecord]:
        """:meth:`usage`'s records from the same ``sacct``, read line by line as they
        arrive (:meth:`SSHPool.stream_lines`): no cap on the whole output, one line
        at most ``max_output_bytes``, one SSH window of output pending at a time."""
        if until is not None and until <= since:
            return
        user, command, fields, now = self._usage_command(since, accounts, until)
        lines = self._pool.stream_lines(user, command,
                                        failure=lambda status, stderr: errors.query_failure("sacct", status, stderr))
        try:
            jobs = parse.iter_sacct_parsable(lines, fields)
            yield from self._usage_records(jobs, since, until, now, 0)
        finally:
            lines.close()

    def _usage_command(self, since: datetime, accounts: Sequence[str] | None,
                       until: datetime | None) -> tuple[str, str, tuple[str, ...], datetime]:
        """The query user, the ``sacct`` of a usage window, its fields and the "now" it is relative to."""
        user = self._query_user()
        now = now_utc()
        seconds, until_back = relative_window(since, until, now, self.config.usage_clock_margin_seconds)
        try:
            fields = self._usage_fields(user)
            command = commands.build_sacct_window(seconds, accounts=accounts, terminal_only=True, fields=fields,
                                                  until_seconds_back=until_back or 0)
        except ValueError as exc:
            raise AdapterError(str(exc), code="invalid_request") from exc
        return user, command, fields, now

    def _usage_records(self, jobs: Iterable[AccountingJob | None], since: datetime, until: datetime | None,
                       now: datetime, skipped: int) -> Iterator[UsageRecord]:
        """The settled records of ``jobs`` (None: a malformed row) that ended in the window."""
        for job in jobs:
            if job is None:
                skipped += 1
                continue
            if not job.is_settled(now, self.config.accounting_lag_seconds):
                continue
            if job.end_time is None or job.end_time < since or (until is not None and job.end_time > until):
                continue
            try:
                yield job.to_usage_record()
            except MalformedRecord as exc:
                skipped += 1
                log.warning("cluster %s: skipping accounting record: %s", self.name, exc)
        if skipped:
            log.warning("cluster %s: usage import skipped %d malformed rows", self.name, skipped)

    # ---------------------------------------------------------- read_output

    def read_output(self, ref: SchedulerJobRef, stream: str = "stdout", tail: int = 65536) -> str:
        """``tail -c`` of the job's ``--output``/``--error`` file, as its user."""
        if stream not in {"stdout", "stderr"}:
            raise AdapterError(f"unknown stream {stream!r}", code="invalid_request")
        out, err = commands.output_paths(self.config.output_dir, _job_id(ref))
        limit = max(0, min(int(tail), max(1, self.config.max_output_bytes - 4096)))
        result = self._pool.run(
            ref.username, commands.build_tail(out if stream == "stdout" else err, limit)
        )
        if not result.ok:
            detail = errors.slurm_message(result.stderr, "tail failed")
            raise AdapterError(
                f"output of job {ref.job_id} unavailable: {detail}", code="output_unavailable"
            )
        return result.stdout

    # ------------------------------------------------------ health/discover

    def health(self) -> Health:
        """TCP connect, host key, login and ``sinfo`` on a fresh connection."""
        started = time.monotonic()
        try:
            login: str | None = self.config.login_for(self._query_user())
        except AdapterConfigError:
            login = None
        try:
            probe = self._pool.probe(login, commands.build_health())
        except Exception as exc:  # health never raises
            return Health(ok=False, detail=f"health check crashed: {exc}")
        latency = (time.monotonic() - started) * 1000
        checks: dict[str, Any] = dict(probe.checks)
        failed = probe.failed
        if failed is not None:
            return Health(ok=False, detail=failed, latency_ms=latency, checks=checks)
        if probe.result is None:
            detail = "reachable, host key ok; set query_username to check login and Slurm"
            return Health(ok=False, detail=detail, latency_ms=latency, checks=checks)
        lines = probe.result.stdout.splitlines()
        version = lines[0].strip() if lines else "?"
        partitions = ",".join(sorted({ln.strip() for ln in lines[1:] if ln.strip()}))
        checks["version"] = version
        return Health(
            ok=True, detail=f"{version}; partitions {partitions}", latency_ms=latency, checks=checks
        )

    def discover(self) -> list[PartitionInfo]:
        """Partitions from ``scontrol show partition`` and ``show node``."""
        user = self._query_user()
        parts = parse.parse_scontrol_oneliner(
            self._query(user, commands.build_discover_partitions(), "scontrol show partition")
        )
        nodes = parse.parse_scontrol_oneliner(
            self._query(user, commands.build_discover_nodes(), "scontrol show node")
        )
        return parse.partitions_from_scontrol(parts, nodes)

    def output_location(self, ref: SchedulerJobRef, stream: str = "stdout") -> str | None:
        """``HOST:PATH`` of the job's output file (under the job user's home unless absolute)."""
        try:
            out, err = commands.output_paths(self.config.output_dir, commands.validate_job_id(ref.job_id))
        except ValueError:
            return None
        path = out if stream == "stdout" else err
        return f"{self.config.host}:{path if path.startswith('/') else f'~{ref.username}/{path}'}"

    def identity(self) -> str | None:
        """``slurm:<ClusterName>@<first SlurmctldHost>`` from ``scontrol show config``."""
        config = parse.parse_show_config(
            self._query(self._query_user(), commands.build_show_config(), "scontrol show config"))
        return slurm_identity(config.get("ClusterName"), config.get("SlurmctldHost[0]"))

    def user_exists(self, username: str) -> bool | None:
        """Whether the login node knows the POSIX user (``getent passwd``)."""
        try:
            command = commands.build_user_lookup(username)
        except ValueError:
            return False
        result = self._run(self._query_user(), command)
        if result.exit_status == 2:  # getent: no such entry
            return False
        if not result.ok:
            raise errors.query_failure("getent passwd", result.exit_status, result.stderr)
        return bool(result.stdout.strip())

    def account_exists(self, account: str) -> bool | None:
        """Whether Slurm's accounting has the account (``sacctmgr show account``)."""
        try:
            command = commands.build_account_lookup(account)
        except ValueError:
            return False
        out = self._query(self._query_user(), command, "sacctmgr show account")
        return any(line.strip() == account for line in out.splitlines())

    def close(self) -> None:
        """Close pooled connections."""
        self._pool.close()


# ------------------------------------------------------------------ helpers


def _job_id(ref: SchedulerJobRef) -> str:
    try:
        return commands.validate_job_id(ref.job_id)
    except ValueError as exc:
        raise AdapterError(str(exc), code="invalid_job_id") from exc


def _pick(records: list[AccountingJob], ref: SchedulerJobRef) -> AccountingJob | None:
    """The accounting record of ``ref`` when a job id appears more than once
    (requeues, id wrap-around): same tag first, then the latest submission."""
    if not records:
        return None
    if ref.tag:
        tagged = [r for r in records if r.tag == ref.tag]
        records = tagged or records
    return max(records, key=lambda r: r.submit_time.timestamp() if r.submit_time else 0.0)


def _first_per_tag(
    candidates: Iterable[tuple[str, str, datetime | None, str | None, str | None]], wanted: set[str]
) -> dict[str, SchedulerJobRef]:
    found: dict[str, SchedulerJobRef] = {}
    seen: dict[str, set[str]] = {}
    for job_id, user, submit, name, account in candidates:
        tag = tag_from_job_name(name)
        if tag is None or tag not in wanted:
            continue
        seen.setdefault(tag, set()).add(job_id)
        current = found.get(tag)
        if current is None or int(job_id) < int(current.job_id):
            found[tag] = SchedulerJobRef(job_id=job_id, username=user, tag=tag, submit_time=submit,
                                         account=account or None)
    for tag, ids in seen.items():
        if len(ids) > 1:
            log.warning(
                "tag %s is on several jobs %s; reporting the first", tag, sorted(ids, key=int)
            )
    return found


def _status_from_queue(job: QueueJob) -> JobStatus:
    started, expected = started_or_expected(job.state, job.start_time)
    return JobStatus(
        job_id=job.job_id,
        state=job.state,
        raw_state=job.raw_state,
        final=False,
        reason=job.reason,
        submit_time=job.submit_time,
        start_time=started,
        end_time=None,
        alloc_tres=dict(job.alloc_tres),
        tag=job.tag,
        expected_start=expected,
    )


def _status_from_accounting(rec: AccountingJob, *, final: bool) -> JobStatus:
    started, expected = started_or_expected(rec.state, rec.start_time)
    return JobStatus(
        job_id=rec.job_id,
        state=rec.state,
        raw_state=rec.raw_state,
        final=final,
        exit_code=rec.exit_code if final else None,
        reason=rec.reason,
        submit_time=rec.submit_time,
        start_time=started,
        end_time=rec.end_time if final else None,
        elapsed_seconds=rec.elapsed_seconds,
        alloc_tres=dict(rec.alloc_tres),
        tag=rec.tag,
        expected_start=expected,
    )
