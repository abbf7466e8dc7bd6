"""Slurm job arrays: how queue and accounting records name array tasks.

Slurm gives every array task its own job id (``JobIDRaw``) and shows it as
``<array id>_<task>`` (``JobID``); the tasks that have not started yet are one
record, ``<array id>_[2-5%2]`` (squeue ``array_task_string``, sacct ``JobID``),
whose own job id is the array id (the record that becomes the last task). The
broker names a task ``<array id>_<task>`` everywhere (:func:`task_key`).

Checked on the dev clusters 22.05, 24.11 and 26.05: ``squeue --json`` has
``array_job_id``/``array_task_id`` (23.02+ wrapped as ``{"set","number"}``, the
pending record's ``array_task_id`` unset) and ``array_task_string`` (``2-5%2``);
``sacct -P`` ``JobID`` prints ``7_0`` and ``7_[2-5%2]``; ``sacct --json`` has
``array.job_id``, ``array.task_id`` and, on the pending record, ``array.task`` as
a hexadecimal bitmap (``0x3C`` = tasks 2-5).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters.slurm_common.shapes import as_int, as_str
from broker.directives import parse_array

__all__ = [
    "ArrayPart",
    "array_from_accounting",
    "array_from_queue",
    "array_from_queue_text",
    "parse_job_id_text",
    "task_ids_from_bitmap",
    "task_ids_from_text",
    "task_key",
]

_JOB_ID_TEXT = re.compile(r"^(\d+)_(?:(\d+)|\[([0-9,\-:%]+)\])$")


def task_key(array_job_id: str | int, task: int) -> str:
    """``7_3``: how the broker names task 3 of array job 7."""
    return f"{array_job_id}_{task}"


def task_ids_from_text(text: str | None) -> tuple[int, ...]:
    """``2-5%2`` / ``1,3,5-9:2`` / ``[2-5]`` → the task ids (empty when unreadable)."""
    body = (text or "").strip().strip("[]")
    if not body:
        return ()
    try:
        return parse_array(body).task_ids
    except ValueError:
        return ()


def task_ids_from_bitmap(text: str | None) -> tuple[int, ...]:
    """``0x3C`` (sacct JSON ``array.task`` of the pending record) → ``(2, 3, 4, 5)``."""
    value = (text or "").strip()
    if not value.lower().startswith("0x"):
        return ()
    try:
        bits = int(value, 16)
    except ValueError:
        return ()
    return tuple(i for i in range(bits.bit_length()) if bits >> i & 1)


@dataclass(frozen=True)
class ArrayPart:
    """Which array tasks one record stands for: one task (``task``) or the
    not-yet-started ones (``pending``)."""

    array_job_id: str
    task: int | None = None
    pending: tuple[int, ...] = ()

    @property
    def keys(self) -> list[tuple[str, int]]:
        """``(task_key, task)`` for every task this record stands for."""
        tasks = [self.task] if self.task is not None else list(self.pending)
        return [(task_key(self.array_job_id, t), t) for t in tasks]


def parse_job_id_text(text: str) -> ArrayPart | None:
    """sacct ``JobID`` ``7_3`` or ``7_[2-5%2]`` → an :class:`ArrayPart`; None for a
    plain job id."""
    m = _JOB_ID_TEXT.match((text or "").strip())
    if not m:
        return None
    if m.group(2) is not None:
        return ArrayPart(str(int(m.group(1))), task=int(m.group(2)))
    return ArrayPart(str(int(m.group(1))), pending=task_ids_from_text(m.group(3)))


def array_from_queue(job: Mapping[str, Any]) -> ArrayPart | None:
    """The array part of a queue record (``squeue --json`` / REST ``GET jobs``)."""
    array_id = as_int(job.get("array_job_id"))
    if not array_id:  # 0 / unset: not an array job
        return None
    task = as_int(job.get("array_task_id"))
    pending_text = as_str(job.get("array_task_string"))
    if task is not None and not pending_text:
        return ArrayPart(str(array_id), task=task)
    return ArrayPart(str(array_id), pending=task_ids_from_text(pending_text))


def array_from_queue_text(array_job_id: str, task_text: str) -> ArrayPart | None:
    """The array part of a ``squeue --Format=ArrayJobID,ArrayTaskID`` line: ``N/A``
    for a job that is not an array, ``3`` for one task, ``2-5%2`` for the record of
    the pending tasks (a single pending task prints as its number: the same key)."""
    text = task_text.strip()
    if not text or text == "N/A" or not array_job_id.strip().isdigit():
        return None
    array_id = str(int(array_job_id))
    if text.isdigit():
        return ArrayPart(array_id, task=int(text))
    return ArrayPart(array_id, pending=task_ids_from_text(text))


def array_from_accounting(job: Mapping[str, Any]) -> ArrayPart | None:
    """The array part of an accounting record (``sacct --json`` / REST slurmdb job)."""
    array = job.get("array")
    if not isinstance(array, Mapping):
        return None
    array_id = as_int(array.get("job_id"))
    if not array_id:
        return None
    task = as_int(array.get("task_id"))
    if task is not None:
        return ArrayPart(str(array_id), task=task)
    return ArrayPart(str(array_id), pending=task_ids_from_bitmap(as_str(array.get("task"))))
