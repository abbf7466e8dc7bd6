"""The ``slurm_rest`` adapter: Slurm through slurmrestd, jobs run as each user.

Flow of a call: settings → identity (per-user JWT or proxy token) → the API
version discovered from ``/openapi/v3`` (newest supported, optionally
restricted by ``api_version``) → that version's translation layer → the
version-neutral logic here. Every call is one or two HTTP requests:

- ``submit``: one ``POST job/submit`` as the job's user; the broker tag goes into
  the job name and the comment. A GPU request the chosen version would silently
  drop (or any field its served schema lacks) is refused before sending.
- ``poll``: one ``GET jobs`` + at most one ``GET slurmdb/jobs`` per query user
  (just one with ``query_username``), filtered client-side; a job is final only
  when accounting shows a settled terminal record (not slurmdbd's placeholder).
  The exit code is taken from the queue's exact wait status while the queue
  still holds the ended job (22.05's accounting JSON reports 0 for every job).
- ``cancel``: ``DELETE job/{id}`` as the job's user; ended/unknown jobs are fine;
  refusals are read from ``errors``, v0.0.42+'s ``status`` list, or (v0.0.40/41,
  which answer 200 regardless) from the job's state afterwards.
- ``find_by_tag``/``usage``: one queue and/or one accounting query as
  ``query_username``; one malformed record never aborts a batch.
- ``read_output``: slurmrestd cannot read files → ``output_unavailable``.

Accounting start times are sent relative (``now-Nseconds``): 22.05 and
v0.0.40/41 reject bare UNIX timestamps, and relative times need no time zone.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx

from adapters.slurm_common.arrays import task_key
from adapters.slurm_common.identity import slurm_identity
from adapters.slurm_common.states import ACCOUNTING_END_STATES
from adapters.slurm_common.tags import comment_for_tag, job_name_with_tag
from adapters.slurm_common.window import relative_window
from adapters.slurm_rest import convert
from adapters.slurm_rest import errors as slurm_errors
from adapters.slurm_rest.accounting import RestAccountingManager
from adapters.slurm_rest.auth import identity_from_settings
from adapters.slurm_rest.client import JsonObject, RestClient
from adapters.slurm_rest.discovery import Discovery, discover
from adapters.slurm_rest.layers import LAYERS, ApiLayer
from adapters.slurm_rest.model import AccountingQuery, SlurmJob, SubmitRequest
from adapters.slurm_rest.settings import RestSettings
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
    SubmitRejected,
    UsageRecord,
    refuse_directives,
)

log = logging.getLogger("adapters.slurm_rest")

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: margin added to accounting look-backs (clock skew, submit-time rounding)
_LOOKBACK_MARGIN = timedelta(minutes=5)
#: cancel of a job that already ended (or is unknown) is not an error
_CANCEL_OK_CODES = frozenset({"job_not_found", "job_already_done"})


class SlurmRestAdapter(ClusterAdapter):
    """Cluster adapter speaking to slurmrestd (Slurm 22.05, 24.11, 26.05)."""

    def __init__(
        self,
        name: str,
        settings: Mapping[str, Any],
        *,
        data_dir: str,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Check the settings; nothing is contacted until the first call.

        ``transport`` replaces the network (unit tests only).
        """
        super().__init__(name, settings, data_dir=data_dir)
        self.config = RestSettings.from_mapping(settings)
        self._client = RestClient(self.config, identity_from_settings(self.config), transport=transport)
        self._discovery: Discovery | None = None
        self._layer: ApiLayer | None = None
        self._discovery_lock = threading.Lock()

    # ---- version -----------------------------------------------------------
    def api(self, username: str) -> ApiLayer:
        """The translation layer of the discovered version (discovered once)."""
        if self._layer is not None:
            return self._layer
        with self._discovery_lock:
            if self._layer is None:
                doc = self._client.get("/openapi/v3", username=username, during="openapi")
                found = discover(doc, LAYERS, self.config.api_versions)
                log.info("slurm_rest %s: using %s (served: %s)", self.name, found.version, found.served)
                self._discovery = found
                self._layer = LAYERS[found.version]()
            return self._layer

    @property
    def discovery(self) -> Discovery | None:
        """What discovery found (None before the first call)."""
        return self._discovery

    def _query_user(self, purpose: str) -> str:
        user = self.config.query_username
        if not user:
            raise AdapterConfigError(
                f"slurm_rest {self.name}: {purpose} needs the query_username setting "
                "(an account that may read every user's jobs)"
            )
        return user

    # ---- submit ------------------------------------------------------------
    def submit(self, spec: JobSpec) -> SchedulerJobRef:
        """Submit as ``spec.username``; return the ref (job id from slurmrestd)."""
        request = self._submit_request(spec)
        layer = self.api(spec.username)
        body = layer.submit_body(request)
        self._check_fields(layer, body, spec)
        submitted_at = datetime.now(tz=UTC)
        answer = self._client.request(
            "POST",
            layer.submit_path,
            username=spec.username,
            body=body,
            during="submit",
            submitting=True,
        )
        job_id = layer.submitted_job_id(answer)
        if job_id is None:
            raise SubmitOutcomeUnknown(f"slurmrestd submit: no job id in the answer ({list(answer)})")
        return SchedulerJobRef(job_id=job_id, username=spec.username, tag=spec.tag, submit_time=submitted_at)

    def _submit_request(self, spec: JobSpec) -> SubmitRequest:
        _check_spec(spec)
        refuse_directives(spec.script)  # slurmctld does not read them, but nothing may hide there
        environment = dict(spec.environment)
        home = self.config.home_template.format(username=spec.username)
        environment.setdefault("PATH", _DEFAULT_PATH)
        environment.setdefault("HOME", home)
        environment.setdefault("USER", spec.username)
        return SubmitRequest(
            script=spec.script,
            name=job_name_with_tag(spec.name, spec.tag),
            account=spec.account,
            comment=comment_for_tag(spec.tag),
            time_limit_minutes=spec.time_limit_minutes,
            working_directory=spec.working_directory or home,
            environment=environment,
            partition=spec.partition,
            nodes=spec.nodes,
            ntasks_per_node=spec.ntasks_per_node,
            cpus_per_task=spec.cpus_per_task,
            gpus_per_node=spec.gpus_per_node,
            memory_per_node_mb=spec.memory_per_node_mb,
            ntasks=spec.ntasks,
            min_nodes=spec.min_nodes,
            gpu_type=spec.gpu_type,
            exclusive=spec.exclusive,
            constraint=spec.constraint,
            mail_type=spec.mail_type,
            mail_user=spec.mail_user,
            array=spec.array,
            dependency=spec.dependency,
        )

    def _check_fields(self, layer: ApiLayer, body: Mapping[str, Any], spec: JobSpec) -> None:
        """Refuse a body with fields the served schema lacks (they would be dropped)."""
        allowed = self._discovery.job_fields if self._discovery else None
        if allowed is None:
            return
        if spec.gpus_per_node and layer.gpu_request_field not in allowed:
            raise SubmitRejected(
                f"slurmrestd {layer.version} has no {layer.gpu_request_field!r} field: "
                "the GPU request would be ignored",
                code="unsupported_request",
            )
        unknown = sorted(set(layer.job_description(body)) - allowed)
        if unknown:
            raise SubmitRejected(
                f"slurmrestd {layer.version} would ignore job fields {unknown}",
                code="unsupported_request",
            )

    # ---- poll --------------------------------------------------------------
    def poll(self, refs: Sequence[SchedulerJobRef]) -> list[JobStatus]:
        """One queue query + at most one accounting query per query user."""
        statuses: list[JobStatus] = []
        for user, group in self._groups(refs).items():
            statuses.extend(self._poll_group(user, group))
        return statuses

    def expected_start(self, spec: JobSpec) -> StartEstimate:
        """A queue-depth estimate: slurmrestd has no ``--test-only`` (``job/submit``
        always queues), so one ``GET jobs`` as the submitting user: now when nothing
        waits in the partition, else the end (start + time limit) of the N-th running
        job there to finish, N being the number of jobs waiting (beyond: the last
        one's). It cannot see free nodes or GPUs: coarse, and documented as such."""
        _check_spec(spec)
        now = datetime.now(tz=UTC)
        queue = self._queue_jobs(self.api(spec.username), spec.username, None).values()
        part = [j for j in queue if j.partition == spec.partition and not convert.terminal(j)]
        waiting = sum(1 for j in part if j.states and j.states[0] == "PENDING")
        ends = sorted(j.start_time + timedelta(minutes=j.time_limit_minutes) for j in part
                      if j.states and j.states[0] == "RUNNING" and j.start_time and j.time_limit_minutes)
        if not waiting:
            return StartEstimate(now, "queue-depth", f"nothing waits in partition {spec.partition}")
        start = max(now, ends[min(waiting, len(ends)) - 1]) if ends else None
        return StartEstimate(start, "queue-depth",
                             f"{waiting} job(s) wait and {len(ends)} run in partition {spec.partition}")

    def _groups(self, refs: Sequence[SchedulerJobRef]) -> dict[str, list[SchedulerJobRef]]:
        groups: dict[str, list[SchedulerJobRef]] = {}
        for ref in refs:
            user = self.config.query_username or ref.username
            groups.setdefault(user, []).append(ref)
        return groups

    def _poll_group(self, user: str, refs: list[SchedulerJobRef]) -> list[JobStatus]:
        layer = self.api(user)
        now = datetime.now(tz=UTC)
        wanted = {ref.job_id for ref in refs}
        queue = self._queue_jobs(layer, user, wanted)
        need_accounting = [r for r in refs if any(k not in queue or convert.terminal(queue[k]) for k, _ in _keys(r))]
        accounted = self._accounted(layer, user, need_accounting, queue, now)
        statuses: list[JobStatus] = []
        for ref in refs:
            for key, task in _keys(ref):
                status = _status_for(queue.get(key), accounted.get(key), now)
                if status is not None:
                    statuses.append(status if task is None else replace(status, job_id=key, array_task_id=task))
        return statuses

    def _queue_jobs(self, layer: ApiLayer, user: str, wanted: set[str] | None) -> dict[str, SlurmJob]:
        """Queue records by job id, array tasks by ``<array id>_<task>`` (the record
        of an array's pending tasks stands for each of them)."""
        body = self._client.get(layer.jobs_path, username=user, during="job list")
        jobs: dict[str, SlurmJob] = {}
        for item in layer.items(body, "jobs"):
            job = _parse(layer.parse_queue_job, item)
            if job is None:
                continue
            if wanted is not None and job.array is not None:
                if job.array.array_job_id in wanted:
                    jobs.update({key: job for key, _ in job.array.keys})
            elif wanted is None or job.job_id in wanted:
                jobs[job.job_id] = job
        return jobs

    def _accounted(
        self,
        layer: ApiLayer,
        user: str,
        refs: list[SchedulerJobRef],
        queue: Mapping[str, SlurmJob],
        now: datetime,
    ) -> dict[str, SlurmJob]:
        if not refs:
            return {}
        queued = [queue[k] for r in refs for k, _ in _keys(r) if k in queue]
        since = _earliest(refs, queued, now - timedelta(hours=self.config.accounting_lookback_hours))
        query = AccountingQuery(
            lookback_seconds=_seconds_since(since, now),
            users=sorted({r.username for r in refs}),
        )
        try:
            records = self._accounting_jobs(layer, user, query)
        except AdapterError as exc:
            if not exc.transient:
                raise
            log.warning("slurm_rest %s: accounting unavailable during poll: %s", self.name, exc)
            return {}
        wanted = {k for r in refs for k, _ in _keys(r)}
        by_id: dict[str, list[SlurmJob]] = {}
        for record in records:
            keys = [k for k, _ in record.array.keys] if record.array is not None else [record.job_id]
            for key in keys:
                if key in wanted:
                    by_id.setdefault(key, []).append(record)
        return {job_id: best for job_id, found in by_id.items() if (best := convert.newest(found))}

    def _accounting_jobs(self, layer: ApiLayer, user: str, query: AccountingQuery,
                         max_bytes: int | None = None) -> list[SlurmJob]:
        params = layer.accounting_params(query)
        body = self._client.get(layer.db_jobs_path, username=user, during="accounting", params=params,
                                max_bytes=max_bytes)
        records: list[SlurmJob] = []
        for item in layer.items(body, "jobs"):
            record = _parse(layer.parse_accounting_job, item)
            if record is not None:
                records.append(record)
        return records

    # ---- cancel ------------------------------------------------------------
    def cancel(self, ref: SchedulerJobRef) -> None:
        """``DELETE job/{id}`` as the job's user; an ended/unknown job is fine."""
        layer = self.api(ref.username)
        try:
            answer = self._client.request("DELETE", layer.job_path(ref.job_id), username=ref.username, during="cancel")
            failures = slurm_errors.errors_in({"errors": layer.cancel_failures(answer)})
            if failures:
                raise slurm_errors.to_exception(failures, during="cancel")
            if layer.cancel_needs_check:
                self._check_cancelled(layer, ref)
        except AdapterError as exc:
            if exc.code in _CANCEL_OK_CODES:
                log.debug("slurm_rest %s: cancel %s: %s", self.name, ref.job_id, exc.code)
                return
            raise

    def _check_cancelled(self, layer: ApiLayer, ref: SchedulerJobRef) -> None:
        """Where a refused cancel looks like success, the job must have left the
        active states (slurmctld marks a cancelled job at once)."""
        body = self._client.get(layer.job_path(ref.job_id), username=ref.username, during="cancel check")
        for item in layer.items(body, "jobs"):
            job = _parse(layer.parse_queue_job, item)
            if job is not None and job.job_id == ref.job_id and not _cancel_applied(job):
                raise AdapterError(
                    f"slurmrestd cancel: job {ref.job_id} is still {convert.raw_state(job)} "
                    f"after cancelling as {ref.username} (refused, e.g. not the job's owner)",
                    code="cancel_refused",
                )

    # ---- reconciliation ----------------------------------------------------
    def find_by_tag(self, tags: Sequence[str], *, since: datetime | None = None,
                    accounts: Sequence[str] | None = None) -> dict[str, SchedulerJobRef]:
        """Jobs whose name (or comment) carries one of ``tags``: queue, then accounting
        (of ``accounts`` only, when given: slurmdb's ``account`` filter)."""
        wanted = set(tags)
        if not wanted:
            return {}
        user = self._query_user("find_by_tag")
        layer = self.api(user)
        now = datetime.now(tz=UTC)
        found: dict[str, SlurmJob] = {}
        for job in self._queue_jobs(layer, user, None).values():
            _keep_tagged(found, job, wanted)
        start = _aware(since) if since else now - timedelta(hours=self.config.accounting_lookback_hours)
        query = AccountingQuery(lookback_seconds=_seconds_since(start - _LOOKBACK_MARGIN, now),
                                accounts=tuple(accounts or ()))
        for job in self._accounting_jobs(layer, user, query):
            _keep_tagged(found, job, wanted)
        return {
            tag: SchedulerJobRef(job_id=job.array.array_job_id if job.array else job.job_id,
                                 username=job.user or user, tag=tag,
                                 submit_time=job.submit_time, account=job.account)
            for tag, job in found.items()
        }

    # ---- usage -------------------------------------------------------------
    def usage(self, since: datetime, *, accounts: Sequence[str] | None = None,
              until: datetime | None = None) -> list[UsageRecord]:
        """Settled jobs of ``accounts`` (all when None) that ended at or after ``since``
        and not after ``until``.

        One slurmdb jobs query with the end states, ``start_time`` and ``end_time``:
        with states given slurmdbd selects by end time, so ``until`` bounds the
        answer (checked on 22.05, 24.11, 26.05: tests/integration/test_usage_window_live.py).
        The window is widened by ``usage_clock_margin_seconds`` on each side for
        slurmrestd's clock (:mod:`adapters.slurm_common.window`) and the records
        filtered here by their end time. An answer past ``usage_max_response_bytes``
        raises ``OutputTooLarge``.

        Runs as ``query_username``; with ``PrivateData=jobs``/``usage`` that must
        be an operator/admin account or ``SlurmUser`` to see every user's jobs.
        """
        since = _aware(since)
        end = _aware(until) if until is not None else None
        if end is not None and end <= since:
            return []
        user, layer, query = self._usage_query(since, end, accounts)
        records: list[UsageRecord] = []
        for job in self._accounting_jobs(layer, user, query, max_bytes=self.config.usage_max_response_bytes):
            record = _usage_of(job, since, end, accounts)
            if record is not None:
                records.append(record)
        return records

    def iter_usage(self, since: datetime, *, accounts: Sequence[str] | None = None,
                   until: datetime | None = None) -> Iterator[UsageRecord]:
        """:meth:`usage`'s records from the same query, taken from the answer one job
        at a time as it arrives (:meth:`RestClient.stream_items`): no cap on the
        answer, ``usage_max_response_bytes`` on one job. (slurmrestd still builds the
        whole answer before sending it: ``timeout`` must cover that.)"""
        since = _aware(since)
        end = _aware(until) if until is not None else None
        if end is not None and end <= since:
            return
        user, layer, query = self._usage_query(since, end, accounts)
        items = self._client.stream_items(layer.db_jobs_path, key="jobs", username=user, during="accounting",
                                          params=layer.accounting_params(query),
                                          max_item_bytes=self.config.usage_max_response_bytes)
        try:
            for item in items:
                job = _parse(layer.parse_accounting_job, item) if isinstance(item, Mapping) else None
                record = None if job is None else _usage_of(job, since, end, accounts)
                if record is not None:
                    yield record
        finally:
            items.close()

    def _usage_query(self, since: datetime, end: datetime | None,
                     accounts: Sequence[str] | None) -> tuple[str, ApiLayer, AccountingQuery]:
        """The query user, its API layer and the slurmdb jobs query of a usage window."""
        user = self._query_user("usage")
        layer = self.api(user)
        now = datetime.now(tz=UTC)
        back, until_back = relative_window(since, end, now, self.config.usage_clock_margin_seconds)
        return user, layer, AccountingQuery(
            lookback_seconds=back,
            accounts=sorted(set(accounts)) if accounts else (),
            states=ACCOUNTING_END_STATES,
            until_seconds=None if end is None else until_back,
        )

    # ---- output ------------------------------------------------------------
    def read_output(self, ref: SchedulerJobRef, stream: str = "stdout", tail: int = 65536) -> str:
        """slurmrestd offers no file access: always ``output_unavailable``."""
        raise AdapterError(
            f"slurm_rest {self.name}: slurmrestd cannot read job output files",
            transient=False,
            code="output_unavailable",
        )

    # ---- health and discovery ----------------------------------------------
    def health(self) -> Health:
        """Ping slurmctld and slurmdbd through slurmrestd; never raises."""
        from adapters.slurm_rest.health import check_health

        return check_health(self)

    def discover(self) -> list[PartitionInfo]:
        """Partitions with per-node CPU/GPU/memory sizes taken from their nodes."""
        from adapters.slurm_rest.inventory import partitions

        user = self._query_user("discover")
        layer = self.api(user)
        parts = self._client.get(layer.partitions_path, username=user, during="partitions")
        nodes = self._client.get(layer.nodes_path, username=user, during="nodes")
        return partitions(layer, parts, nodes)

    def identity(self) -> str | None:
        """``slurm:<ClusterName>@<primary controller>``: the name from the answers'
        ``meta`` (23.02+) or, on 22.05, the accounting's only cluster; the controller
        from ``ping``. None when the cluster name cannot be told (several clusters
        on one slurmdbd behind a 22.05 slurmrestd)."""
        user = self._query_user("identity")
        layer = self.api(user)
        pinged = self._client.get(layer.ping_path, username=user, during="ping")
        hosts = [layer.parse_ping(item).hostname for item in layer.items(pinged, "pings")]
        slurm_meta = _mapping(_mapping(pinged.get("meta")).get("slurm"))
        name = slurm_meta.get("cluster") if isinstance(slurm_meta.get("cluster"), str) else None
        if not name:
            listed = self._client.get(layer.db_path("clusters"), username=user, during="clusters")
            names = [c.get("name") for c in layer.items(listed, "clusters") if isinstance(c.get("name"), str)]
            name = names[0] if len(names) == 1 else None
        return slurm_identity(name, hosts[0] if hosts else None)

    def accounting(self) -> RestAccountingManager:
        """slurmdb endpoints as ``admin_username`` (writes: v0.0.40+ only)."""
        return RestAccountingManager(
            cluster=self.name, client=self._client, layer=self.api, cluster_name=self._slurm_cluster_name,
            admin_username=self.config.admin_username, reader=self.config.query_username)

    def _slurm_cluster_name(self) -> str | None:
        identity = self.identity()
        return identity.split(":", 1)[1].split("@", 1)[0] if identity else None

    def user_exists(self, username: str) -> bool | None:
        """Whether Slurm's accounting has the user (slurmrestd cannot see POSIX
        accounts; with enforced associations a user without one cannot run jobs)."""
        return self._db_record_exists("user", username, "users")

    def account_exists(self, account: str) -> bool | None:
        """Whether Slurm's accounting has the account."""
        return self._db_record_exists("account", account, "accounts")

    def _db_record_exists(self, kind: str, name: str, key: str) -> bool:
        user = self._query_user(f"{kind} lookup")
        layer = self.api(user)
        try:
            body = self._client.get(layer.db_path(f"{kind}/{quote(name, safe='')}", collection=False),
                                    username=user, during=f"{kind} lookup")
        except AdapterError as exc:
            if exc.code == "empty_result":  # 22.05: "[9003] Nothing found" (in a 500 answer)
                return False
            raise
        return any(item.get("name") == name for item in layer.items(body, key))

    @property
    def request_count(self) -> int:
        """HTTP requests sent to slurmrestd so far (discovery included)."""
        return self._client.calls

    def probe(self) -> int:
        """HTTP status of an unauthenticated request (reachability only)."""
        return self._client.probe()

    def get(self, path: str, *, username: str, during: str) -> JsonObject:
        """A raw authenticated GET (used by the health check)."""
        return self._client.get(path, username=username, during=during)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()


# ---- helpers ---------------------------------------------------------------
def _keys(ref: SchedulerJobRef) -> list[tuple[str, int | None]]:
    """What a ref is answered as: its job id, or ``<id>_<task>`` per array task."""
    if ref.array_tasks is None:
        return [(ref.job_id, None)]
    return [(task_key(ref.job_id, t), t) for t in ref.array_tasks]


def _check_spec(spec: JobSpec) -> None:
    problems: list[str] = []
    for key in spec.environment:
        if not _ENV_NAME_RE.match(key):
            problems.append(f"environment name {key!r}")
    for key, value in spec.environment.items():
        if "\x00" in value:
            problems.append(f"environment value of {key!r} contains NUL")
    if "\x00" in spec.script:
        problems.append("script contains NUL")
    if spec.time_limit_minutes <= 0:
        problems.append("time_limit_minutes must be > 0")
    if min(spec.nodes, spec.ntasks_per_node, spec.cpus_per_task) < 1 or spec.gpus_per_node < 0:
        problems.append("sizes must be positive")
    if problems:
        raise SubmitRejected("invalid job: " + "; ".join(problems), code="invalid_request")


def _parse(parser: Any, item: Mapping[str, Any]) -> SlurmJob | None:
    """One record through a layer parser; a malformed one is logged and skipped."""
    try:
        job: SlurmJob = parser(item)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        log.warning("slurm_rest: skipping malformed job record: %s", exc)
        return None
    if job.job_id in ("None", "0", ""):
        log.warning("slurm_rest: skipping a job record without a job id")
        return None
    return job


def _status_for(queued: SlurmJob | None, accounted: SlurmJob | None, now: datetime) -> JobStatus | None:
    """Accounting settles. The exit code comes from the queue while it still holds
    the ended job (its wait status is exact on every release; 22.05's accounting
    JSON loses exit codes, 24.11's reports 0 for TIMEOUT/CANCELLED)."""
    if accounted is not None and convert.settled(accounted):
        if queued is not None and queued.exit_code is not None and convert.terminal(queued):
            accounted = replace(accounted, exit_code=queued.exit_code)
        return convert.to_status(accounted, final=True, now=now)
    if queued is not None:
        return convert.to_status(queued, final=False, now=now)
    if accounted is not None:
        return convert.to_status(accounted, final=False, now=now)
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _cancel_applied(job: SlurmJob) -> bool:
    words = {w.upper() for w in job.states}
    return convert.terminal(job) or bool(words & {"CANCELLED", "COMPLETING"})


def _earliest(refs: Iterable[SchedulerJobRef], queued: Iterable[SlurmJob], default: datetime) -> datetime:
    times = [r.submit_time for r in refs if r.submit_time is not None]
    times += [q.submit_time for q in queued if q.submit_time is not None]
    if not times:
        return default
    return min(_aware(t) for t in times) - _LOOKBACK_MARGIN


def _seconds_since(start: datetime, now: datetime) -> int:
    return max(60, int((now - start).total_seconds()))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _keep_tagged(found: dict[str, SlurmJob], job: SlurmJob, wanted: set[str]) -> None:
    tag = convert.job_tag(job)
    if tag is None or tag not in wanted:
        return
    current = found.get(tag)
    if current is None or convert.newest([current, job]) is job:
        found[tag] = job


def _usage_of(job: SlurmJob, since: datetime, until: datetime | None,
              accounts: Sequence[str] | None) -> UsageRecord | None:
    if accounts and job.account not in accounts:
        return None
    if job.end_time is None or job.end_time < since or (until is not None and job.end_time > until):
        return None
    record = convert.to_usage(job)
    if record is None and convert.terminal(job):
        log.debug("slurm_rest: job %s not importable yet (placeholder or incomplete)", job.job_id)
    return record
