"""Pure parsers of what the Slurm commands print (no I/O).

JSON readers accept the 22.05 and the 23.02+ (24.11, 26.05) shapes; one
malformed job record is logged and skipped, never fatal for the batch.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from adapters.slurm_common.accounting import (
    SACCT_PARSABLE_FIELDS,
    AccountingJob,
    MalformedRecord,
    accounting_job_from_json,
    accounting_job_from_parsable,
)
from adapters.slurm_common.queue import (
    QueueJob,
    queue_job_from_json,
    queue_job_from_text,
    split_poll_line,
)
from adapters.slurm_common.shapes import epoch_to_datetime
from adapters.slurm_common.tres import gres_counts, parse_tres_string
from broker.adapter import ClusterUnreachable, PartitionInfo

__all__ = [
    "QueueLine",
    "iter_sacct_parsable",
    "parse_max_time",
    "parse_queue_text",
    "parse_sacct_json",
    "parse_sacct_parsable",
    "parse_sbatch_job_id",
    "parse_scontrol_oneliner",
    "parse_squeue_json",
    "parse_squeue_poll",
    "parse_version",
    "partitions_from_scontrol",
]

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_/:.]*=")


def parse_version(text: str) -> tuple[int, int]:
    """``"slurm 22.05.8"`` → ``(22, 5)``; ValueError when no version is found."""
    m = _VERSION_RE.search(text or "")
    if not m:
        raise ValueError(f"no Slurm version in {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_sbatch_job_id(stdout: str) -> str:
    """The job id ``sbatch --parsable`` printed (``"123"`` or ``"123;cluster"``)."""
    for line in (stdout or "").splitlines():
        head = line.strip().split(";", 1)[0]
        if head.isdigit():
            return str(int(head))
    raise ValueError(f"no job id in sbatch output {stdout[:200]!r}")


_TEST_ONLY_RE = re.compile(r"to start at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)")


def parse_test_only(stderr: str) -> datetime | None:
    """The start ``sbatch --test-only`` predicts (``Job 12 to start at
    2026-11-30T04:53:48 using ...``; printed under ``TZ=UTC``), None without one."""
    m = _TEST_ONLY_RE.search(stderr or "")
    if m is None:
        return None
    return datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC)


def _load_jobs(text: str, what: str) -> list[Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: output is not JSON ({exc})") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("jobs"), list):
        raise ValueError(f"{what}: no 'jobs' list in the output")
    _raise_reported_errors(doc, what)
    return list(doc["jobs"])


def _raise_reported_errors(doc: Mapping[str, Any], what: str) -> None:
    """Slurm 22.05 exits 0 with ``errors[]`` and no jobs when slurmctld is down:
    that is an unreachable scheduler, never "every job left the queue"."""
    errors = [e for e in doc.get("errors") or [] if isinstance(e, Mapping)]
    texts = [str(e.get("description") or e.get("error") or "error") for e in errors]
    if not texts or all("invalid job id" in t.lower() for t in texts):
        return
    raise ClusterUnreachable(f"{what}: {'; '.join(texts)[:500]}", code="scheduler_error")


def parse_squeue_json(text: str) -> list[QueueJob]:
    """Jobs of ``squeue --json``; malformed records are skipped."""
    jobs: list[QueueJob] = []
    for raw in _load_jobs(text, "squeue --json"):
        try:
            jobs.append(queue_job_from_json(raw))
        except (MalformedRecord, TypeError, ValueError) as exc:
            log.warning("skipping malformed squeue record: %s", exc)
    return jobs


def parse_squeue_poll(
    text: str, mark: str, wanted: Collection[str] | None = None
) -> tuple[list[QueueJob], int]:
    """Lines of the poll's ``squeue`` (:func:`~adapters.slurm_ssh.commands.build_squeue_poll`
    with ``mark``). With ``wanted``, only the lines of those jobs (by job id, or by
    array job id for array tasks) are read: a poll of many jobs reads the whole queue.
    Returns the jobs and the number of lines skipped as malformed (such as the two
    halves of a line whose reason holds a line break). ValueError when there were
    lines and none was readable: not squeue's answer in this format."""
    jobs: list[QueueJob] = []
    skipped = passed = 0
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        try:
            row = split_poll_line(line, mark)
            if wanted is not None and row[0] not in wanted and row[1] not in wanted:
                passed += 1  # another job's line
                continue
            jobs.append(queue_job_from_text(row))
        except MalformedRecord as exc:
            skipped += 1
            log.warning("skipping malformed squeue line %r: %s", line[:200], exc)
    if skipped and not jobs and not passed:
        raise ValueError(f"squeue: none of {skipped} lines is readable")
    return jobs, skipped


def parse_sacct_json(text: str) -> list[AccountingJob]:
    """Jobs of ``sacct --json``; malformed records are skipped."""
    jobs: list[AccountingJob] = []
    for raw in _load_jobs(text, "sacct --json"):
        try:
            jobs.append(accounting_job_from_json(raw))
        except (MalformedRecord, TypeError, ValueError) as exc:
            log.warning("skipping malformed sacct record: %s", exc)
    return jobs


def _split_rows(lines: Iterable[str], width: int) -> Iterator[list[str] | str]:
    for line in lines:
        if not line.strip():
            continue
        parts = line.split("|", width - 1)
        yield parts if len(parts) == width else line


def parse_sacct_parsable(
    text: str, fields: Sequence[str] = SACCT_PARSABLE_FIELDS
) -> tuple[list[AccountingJob], int]:
    """Rows of ``sacct -P --noheader --format=<fields>`` (job name last, times as
    epoch seconds). Returns the jobs and the number of rows skipped as malformed."""
    jobs: list[AccountingJob] = []
    skipped = 0
    for job in iter_sacct_parsable((text or "").splitlines(), fields):
        if job is None:
            skipped += 1
        else:
            jobs.append(job)
    return jobs, skipped


def iter_sacct_parsable(lines: Iterable[str], fields: Sequence[str] = SACCT_PARSABLE_FIELDS
                        ) -> Iterator[AccountingJob | None]:
    """:func:`parse_sacct_parsable` one line at a time (an output read as a stream):
    each row's job, or None for a row skipped as malformed (logged)."""
    for row in _split_rows(lines, len(fields)):
        if isinstance(row, str):
            log.warning("skipping malformed sacct row: %r", row[:200])
            yield None
            continue
        try:
            yield accounting_job_from_parsable(dict(zip(fields, row, strict=True)))
        except (MalformedRecord, TypeError, ValueError) as exc:
            log.warning("skipping malformed sacct row: %s", exc)
            yield None


@dataclass(frozen=True)
class QueueLine:
    """One line of ``squeue --format=%i|%u|%V|%a|%j``."""

    job_id: str
    user: str
    submit_time: datetime | None
    account: str
    name: str


def parse_queue_text(text: str) -> list[QueueLine]:
    """Lines of ``squeue --noheader --format=%i|%u|%V|%a|%j`` (epoch times);
    an array task (``7_3``, ``7_[2-5%2]``) stands for its array job (``7``);
    malformed lines are skipped."""
    lines: list[QueueLine] = []
    for row in _split_rows((text or "").splitlines(), 5):
        if isinstance(row, str):
            continue
        job_id, user, submit, account, name = row
        job_id = job_id.strip().split("_", 1)[0]
        if not job_id.isdigit():
            continue
        lines.append(QueueLine(str(int(job_id)), user.strip(), epoch_to_datetime(submit), account.strip(), name))
    return lines


# --------------------------------------------------------------------------- discover


def parse_scontrol_oneliner(text: str) -> list[dict[str, str]]:
    """``scontrol --oneliner show partition|node`` → one dict per line. Values
    may contain spaces (``OS=Linux 6.1 #1 SMP``): a word that does not start a
    ``Key=`` belongs to the previous value."""
    records: list[dict[str, str]] = []
    for line in (text or "").splitlines():
        record: dict[str, str] = {}
        last: str | None = None
        for word in line.split():
            if _KEY_RE.match(word):
                key, _, value = word.partition("=")
                record[key] = value
                last = key
            elif last is not None:
                record[last] = f"{record[last]} {word}"
        if record:
            records.append(record)
    return records


def parse_max_time(text: str | None) -> int | None:
    """Slurm time limit text → minutes; ``UNLIMITED``/``INFINITE``/empty → None.

    Forms: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.
    """
    value = (text or "").strip()
    if not value or value.upper() in {"UNLIMITED", "INFINITE", "NONE"}:
        return None
    m = _TIME_RE.match(value)
    if not m:
        return None
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        hours, minutes, seconds = [*nums, 0, 0, 0][:3]
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(nums) == 1:
        total = nums[0] * 60
    elif len(nums) == 2:
        total = nums[0] * 60 + nums[1]
    else:
        total = nums[0] * 3600 + nums[1] * 60 + nums[2]
    return (total + 59) // 60


def _int(text: str | None) -> int:
    try:
        return int((text or "0").strip())
    except ValueError:
        return 0


def _node_names(partition: Mapping[str, str], nodes: Sequence[Mapping[str, str]]) -> list[str]:
    name = partition.get("PartitionName", "")
    return [
        n.get("NodeName", "")
        for n in nodes
        if name in (n.get("Partitions") or "").split(",")
    ]


def partitions_from_scontrol(
    partitions: Sequence[Mapping[str, str]], nodes: Sequence[Mapping[str, str]]
) -> list[PartitionInfo]:
    """PartitionInfo from ``scontrol show partition`` + ``show node`` records.

    Per-node figures are the smallest over the partition's nodes (what any job
    can count on); the partition's ``TRES=`` string gives the totals.
    """
    result: list[PartitionInfo] = []
    for part in partitions:
        name = part.get("PartitionName")
        if not name:
            continue
        members = [n for n in nodes if n.get("NodeName") in set(_node_names(part, nodes))]
        cpus = [_int(n.get("CPUTot")) for n in members]
        mems = [_int(n.get("RealMemory")) for n in members]
        gpus = [gres_counts(n.get("Gres")).get("gpu", 0) for n in members]
        result.append(
            PartitionInfo(
                name=name,
                default=part.get("Default", "NO").upper() == "YES",
                nodes=_int(part.get("TotalNodes")) or len(members),
                cpus_per_node=min(cpus) if cpus else 0,
                gpus_per_node=min(gpus) if gpus else 0,
                memory_per_node_mb=min(mems) if mems else 0,
                max_time_minutes=parse_max_time(part.get("MaxTime")),
                tres=parse_tres_string(part.get("TRES")),
            )
        )
    return result


def parse_show_config(text: str) -> dict[str, str]:
    """``scontrol show config`` → ``{"ClusterName": "dev2205", "SlurmctldHost[0]": "vm(127.0.0.1)"}``."""
    found: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            found[key.strip()] = value.strip()
    return found

