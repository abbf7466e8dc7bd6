"""The adapter plugin contract: what every cluster adapter implements.

Adapters import only this module (and :mod:`broker.states`) from the core: never
FastAPI, never the database. The interface is **synchronous**: the broker calls
adapters from worker threads (API requests run in FastAPI's thread pool, the
tracker has its own thread), so a blocking SSH or HTTP call never stalls the event
loop. An adapter must be thread-safe: several threads may call one instance.

Exceptions (one hierarchy, all subclasses of :class:`AdapterError`):

- ``AdapterError``            base; ``transient`` says whether retrying may help.
- ``ClusterUnreachable``      transient: connection refused/timed out, daemon down.
- ``SubmitRejected``          permanent: the scheduler refused the job (bad account,
                              partition, QOS/association limit...). ``code`` is a
                              stable problem code.
- ``SubmitOutcomeUnknown``    the submit may or may not have reached the cluster
                              (timeout after sending): the broker must reconcile
                              by tag, never blindly resubmit.
- ``AdapterConfigError``      permanent: the cluster definition is unusable.
- ``OutputTooLarge``          the answer exceeded the transport's size cap (code
                              ``output_too_large``): asking for less (a narrower
                              accounting window) may succeed, asking again will not.
"""

from __future__ import annotations

import abc
import difflib
import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from broker.directives import header_lines
from broker.states import JobState

if TYPE_CHECKING:
    from broker.accounting import AccountingManager

__all__ = [
    "AdapterConfigError",
    "AdapterError",
    "ClusterAdapter",
    "ClusterUnreachable",
    "Health",
    "JobSpec",
    "JobState",
    "JobStatus",
    "OutputTooLarge",
    "PartitionInfo",
    "SchedulerJobRef",
    "SubmitOutcomeUnknown",
    "SubmitRejected",
    "UsageRecord",
    "refuse_directives",
    "reject_unknown_settings",
    "usage_accepts_until",
]


class AdapterError(Exception):
    """Base of all adapter errors. ``transient`` = retrying later may succeed."""

    transient: bool = False
    code: str = "cluster_error"

    def __init__(self, message: str, *, transient: bool | None = None, code: str | None = None):
        super().__init__(message)
        if transient is not None:
            self.transient = transient
        if code is not None:
            self.code = code


class ClusterUnreachable(AdapterError):
    """The cluster (or its daemon) cannot be reached right now."""

    transient = True
    code = "cluster_unavailable"


class SubmitRejected(AdapterError):
    """The scheduler refused the job; resubmitting the same request will fail again."""

    transient = False
    code = "submit_rejected"


class SubmitOutcomeUnknown(AdapterError):
    """The request may have created a job: reconcile with ``find_by_tag``."""

    transient = True
    code = "submit_outcome_unknown"


class AdapterConfigError(AdapterError):
    """The cluster definition cannot work (missing key, bad URL, unsupported version)."""

    transient = False
    code = "cluster_misconfigured"


class OutputTooLarge(AdapterError):
    """The scheduler's answer exceeded the transport's size cap (``max_output_bytes``
    of ``slurm_ssh``, ``usage_max_response_bytes`` of ``slurm_rest``). The same
    question will fail the same way; a smaller one (a narrower ``usage`` window) may
    not. Third-party adapters may raise a plain ``AdapterError`` with this ``code``."""

    transient = False
    code = "output_too_large"


def reject_unknown_settings(adapter: str, settings: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse ``connection`` keys the adapter does not know (a misspelled key would
    otherwise be silently ignored and its default used), naming the closest known key."""
    allowed = sorted(set(known))
    unknown = sorted(str(k) for k in settings if k not in allowed)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, allowed, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise AdapterConfigError(f"{adapter}: unknown connection setting(s) {', '.join(hints)}; "
                             f"known: {', '.join(allowed)}")


@dataclass(frozen=True)
class JobSpec:
    """A validated job request, as the adapter must submit it.

    ``tag`` is the broker's id for the job; the adapter attaches it so that
    ``find_by_tag`` can find the job again (e.g. in the job name and comment,
    since clusters may not store comments in accounting).
    ``username`` is the POSIX account the job must run as; ``account`` is the
    scheduler account (Slurm ``--account``) charged for it.

    This is the *effective request* (broker.directives): the adapter submits exactly
    these fields and nothing else. ``script`` has its ``#SBATCH`` lines already
    neutralised by the broker, so the scheduler must not find directives in it;
    an adapter that cannot express a field it is given must refuse the job
    (SubmitRejected), never drop the field. The fields after ``working_directory``
    are optional and their defaults mean "not asked".
    """

    tag: str
    username: str
    account: str
    script: str
    time_limit_minutes: int
    name: str = "job"
    partition: str | None = None
    nodes: int = 1
    ntasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    memory_per_node_mb: int | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    working_directory: str | None = None
    #: total tasks (``--ntasks``); ``ntasks_per_node`` is then their maximum per node
    ntasks: int | None = None
    #: lower end of a ``--nodes=min-max`` range (``nodes`` is the upper end)
    min_nodes: int | None = None
    #: GPU type of ``gpus_per_node`` (``--gres=gpu:TYPE:N``)
    gpu_type: str | None = None
    #: whole nodes (``--exclusive``)
    exclusive: bool = False
    #: node features (``--constraint``)
    constraint: str | None = None
    #: ``--mail-type`` (comma list, upper case) and ``--mail-user``
    mail_type: str | None = None
    mail_user: str | None = None
    #: ``--array`` index expression (``0-15:2%4``)
    array: str | None = None
    #: ``--dependency`` with *scheduler* job ids (``afterok:123:124``)
    dependency: str | None = None


@dataclass(frozen=True)
class SchedulerJobRef:
    """How the broker finds a job on a cluster again."""

    job_id: str
    username: str
    tag: str | None = None
    submit_time: datetime | None = None
    #: the scheduler account charged (set by ``find_by_tag``: reconciliation checks it)
    account: str | None = None
    #: an array job (``--array``): the task ids the broker still tracks. ``poll``
    #: then reports each of these tasks as its own :class:`JobStatus` whose
    #: ``job_id`` is ``<job_id>_<task>`` (Slurm's own notation) and whose
    #: ``array_task_id`` is set; ``cancel`` of a ref whose ``job_id`` is
    #: ``<job_id>_<task>`` cancels that one task, of ``<job_id>`` the whole array.
    array_tasks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class JobStatus:
    """One job's state as the scheduler reports it.

    ``state`` is the broker state (translated by the adapter's table), ``raw_state``
    the scheduler's own word. ``final`` is True only when accounting (not just the
    queue) confirms the end, so the broker can settle. ``alloc_tres`` maps TRES
    names (``cpu``, ``node``, ``mem`` in MB, ``gres/gpu``, ``billing``) to the
    counts allocated to the job; with ``elapsed_seconds`` it is what gets charged.
    ``reason`` is the scheduler's own word for why the job waits (or ended):
    ``Resources``, ``Priority``, ``AssocGrpGRESMinutes``... ``start_time`` is set
    only once the job has started; for a pending job the scheduler's projected
    start (``squeue --start``) goes in ``expected_start`` instead.
    """

    job_id: str
    state: JobState
    raw_state: str
    final: bool = False
    exit_code: int | None = None
    reason: str | None = None
    submit_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    elapsed_seconds: int | None = None
    alloc_tres: Mapping[str, float] = field(default_factory=dict)
    tag: str | None = None
    expected_start: datetime | None = None
    #: set for one task of an array job (``job_id`` is then ``<array id>_<task>``)
    array_task_id: int | None = None


@dataclass(frozen=True)
class UsageRecord:
    """One finished job from the cluster's accounting, for usage import.

    Keyed for exactly-once import by (cluster, ``job_id``, ``submit_time``), and by
    ``global_id`` where the scheduler has a cluster-wide unique id (Slurm 26.05+
    ``sluid``), which stays unique even when job ids restart. A task of an array
    job carries ``array_job_id``/``array_task_id`` (its ``job_id`` is the task's
    own scheduler id), so the importer can tell a broker array's tasks apart.
    """

    job_id: str
    account: str
    username: str
    partition: str | None
    state: JobState
    raw_state: str
    submit_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    elapsed_seconds: int
    alloc_tres: Mapping[str, float]
    tag: str | None = None
    name: str | None = None
    global_id: str | None = None
    array_job_id: str | None = None
    array_task_id: int | None = None


@dataclass(frozen=True)
class Health:
    """Result of a live health check."""

    ok: bool
    detail: str
    latency_ms: float | None = None
    checks: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PartitionInfo:
    """A partition as discovered from the scheduler."""

    name: str
    default: bool = False
    nodes: int = 0
    cpus_per_node: int = 0
    gpus_per_node: int = 0
    memory_per_node_mb: int = 0
    max_time_minutes: int | None = None
    tres: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StartEstimate:
    """When a job would start if submitted now (placement, ``cluster: auto``).

    ``method`` says how it was obtained: ``test-only`` (the scheduler's own
    ``sbatch --test-only``), ``queue-depth`` (an estimate from the jobs ahead in the
    partition's queue), or an adapter's own word. ``start`` is None when the
    scheduler could not say; ``detail`` is the scheduler's answer for people."""

    start: datetime | None
    method: str
    detail: str = ""


class ClusterAdapter(abc.ABC):
    """A cluster adapter. Constructed with the cluster's name and settings mapping.

    ``settings`` is the ``connection`` table of the cluster definition (plain data:
    strings, numbers, lists). ``data_dir`` is the broker's data directory (for keys
    or per-job directories). Construction must not contact the cluster.
    """

    #: True for adapters that run jobs as the broker's own OS user (dev only).
    runs_as_broker_user: bool = False

    def __init__(self, name: str, settings: Mapping[str, Any], *, data_dir: str) -> None:
        self.name = name
        self.settings = dict(settings)
        self.data_dir = data_dir

    @abc.abstractmethod
    def submit(self, spec: JobSpec) -> SchedulerJobRef:
        """Submit one job as ``spec.username``; return its reference."""

    @abc.abstractmethod
    def poll(self, refs: Sequence[SchedulerJobRef]) -> list[JobStatus]:
        """Return the status of every job in ``refs`` in as few scheduler calls as
        possible (one queue query + one accounting query). A job the scheduler no
        longer knows and accounting has not confirmed yet is omitted or returned
        with ``final=False``; never invent a terminal state."""

    @abc.abstractmethod
    def cancel(self, ref: SchedulerJobRef) -> None:
        """Cancel a job; cancelling an already finished job is not an error. An
        adapter that cannot address one waiting array task alone (pyslurm: jobs by
        number only) refuses it with a non-transient ``AdapterError`` whose code is
        ``task_not_started`` — never by cancelling more or less than was asked."""

    @abc.abstractmethod
    def find_by_tag(self, tags: Sequence[str], *, since: datetime | None = None,
                    accounts: Sequence[str] | None = None) -> dict[str, SchedulerJobRef]:
        """Find jobs carrying the given broker tags; return tag -> ref for those found.

        ``since``: none was submitted before it. ``accounts`` (lower case, as Slurm
        stores them): each job was submitted under one of them, so an adapter may
        narrow its accounting read to them (on a busy scheduler, all jobs of the window
        are far more than these accounts'); a job found under another account is not
        the broker's anyway (the reconciler checks the account of what it adopts).
        (Adapters written before ``accounts`` existed, without the parameter, still
        work: see :func:`find_by_tag_accepts_accounts`.)"""

    @abc.abstractmethod
    def usage(self, since: datetime, *, accounts: Sequence[str] | None = None,
              until: datetime | None = None) -> list[UsageRecord]:
        """Finished jobs of ``accounts`` (all when None) that ended after ``since``
        and, when ``until`` is given, not after ``until``.

        ``until`` bounds the answer, so that the usage importer can read a busy
        accounting window in pieces: an adapter must pass it on to the scheduler
        where it can (Slurm: ``sacct --endtime``, slurmdb ``end_time``), not only
        filter afterwards. When the answer is too large for the transport, raise
        :class:`OutputTooLarge` (code ``output_too_large``): the importer then asks
        for narrower windows. (Adapters written before ``until`` existed, without
        the parameter, still work: see :func:`usage_accepts_until`.)"""

    def iter_usage(self, since: datetime, *, accounts: Sequence[str] | None = None,
                   until: datetime | None = None) -> Iterator[UsageRecord]:
        """The records of :meth:`usage`, in any order, read as they arrive instead
        of as one answer: without the answer's size cap, holding one record at a
        time (a size cap per record may remain). The importer asks for it only when
        one account's narrowest window is too large for :meth:`usage` (many jobs
        ending in the same second): no narrower question exists then.

        The default yields :meth:`usage`'s list, so an adapter that cannot stream
        raises :class:`OutputTooLarge` here too (the import of that window stops,
        loudly, until the cap is raised). Closing the iterator early must free the
        connection."""
        yield from self.usage(since, accounts=accounts, until=until)

    @abc.abstractmethod
    def read_output(self, ref: SchedulerJobRef, stream: str = "stdout", tail: int = 65536) -> str:
        """The last ``tail`` bytes of the job's ``stdout`` or ``stderr``."""

    @abc.abstractmethod
    def health(self) -> Health:
        """A live check of the cluster; never raises for an unreachable cluster."""

    @abc.abstractmethod
    def discover(self) -> list[PartitionInfo]:
        """Partitions and their TRES."""

    def accounting(self) -> AccountingManager:
        """The cluster's accounting manager (Slurm-native enforcement, account import).

        Optional: adapters that cannot reach the scheduler's accounting keep this
        default, which refuses with ``AdapterConfigError`` (``enforcement_unsupported``)."""
        raise AdapterConfigError(f"adapter of cluster {self.name} cannot manage scheduler accounting",
                                 code="enforcement_unsupported")

    def identity(self) -> str | None:
        """Which scheduler this adapter reaches, the same string through every adapter
        that reaches it (Slurm: ``slurm:<ClusterName>@<primary controller host>``), so
        that two cluster definitions of one machine import each job once. None when
        the adapter cannot tell (the definition is then its own scheduler)."""
        return None

    def output_location(self, ref: SchedulerJobRef, stream: str = "stdout") -> str | None:
        """Where the job's ``stdout``/``stderr`` file is, for people (None: not known).
        Computed, never looked up: no call to the cluster."""
        return None

    def user_exists(self, username: str) -> bool | None:
        """Whether ``username`` is a user jobs can run as (None: cannot tell)."""
        return None

    def account_exists(self, account: str) -> bool | None:
        """Whether the scheduler has the account ``account`` (None: cannot tell)."""
        return None

    def expected_start(self, spec: JobSpec) -> StartEstimate | None:
        """When ``spec`` would start if submitted now, without submitting it (None:
        the adapter cannot tell). Raises ``AdapterError`` when the scheduler refuses
        the request outright (it could never run there) or cannot be reached."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and pools."""


def usage_accepts_until(adapter: ClusterAdapter) -> bool:
    """Whether ``adapter.usage`` takes the ``until`` bound (added to the contract
    later). Told from the signature, not from a class attribute, which a plugin written
    before ``until`` existed would inherit while its own ``usage`` lacks the parameter.
    Such a plugin keeps working: the importer reads its whole window in one call, as
    before, and cannot split a window that is too large. ``**kwargs`` counts as taking
    it (the importer filters the answer by end time itself in any case)."""
    return _takes_keyword(adapter.usage, "until")


def find_by_tag_accepts_accounts(adapter: ClusterAdapter) -> bool:
    """Whether ``adapter.find_by_tag`` takes ``accounts`` (added to the contract later;
    told from the signature as :func:`usage_accepts_until`). A plugin without it is
    asked without: it reads its whole window, as before."""
    return _takes_keyword(adapter.find_by_tag, "accounts")


def _takes_keyword(method: Any, name: str) -> bool:
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):  # a builtin or C extension without a signature
        return False
    found = params.get(name)
    if found is not None:
        return found.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def refuse_directives(script: str) -> None:
    """Raise SubmitRejected if ``script`` still has an ``#SBATCH``/``#SLURM`` line in
    its leading block: the broker neutralises them before any adapter sees the
    script, so one left means a caller bypassed the effective request — and a
    scheduler that read it could allocate more than was priced."""
    for number, line, _ in header_lines(script):
        raise SubmitRejected(f"script line {number} is a scheduler directive ({line.strip()[:80]!r}); the "
                             "broker submits the effective request only", code="unsupported_directive")
