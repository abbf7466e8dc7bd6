"""Array task records as the dev clusters print them (22.05 plain values, 24.11/26.05
wrapped numbers): squeue/REST queue jobs, sacct -P ``JobID`` and sacct/slurmdb JSON."""

from __future__ import annotations

import pytest

from adapters.slurm_common.accounting import accounting_job_from_json
from adapters.slurm_common.arrays import (
    ArrayPart,
    array_from_queue,
    array_from_queue_text,
    parse_job_id_text,
    task_ids_from_bitmap,
    task_ids_from_text,
)
from adapters.slurm_common.queue import queue_job_from_json


def _n(value: int, *, is_set: bool = True) -> dict[str, object]:
    return {"set": is_set, "infinite": False, "number": value}


@pytest.mark.parametrize(("item", "keys"), [
    # 22.05: a running task, the record of the pending ones, a plain job
    ({"job_id": 8, "array_job_id": 7, "array_task_id": 0, "array_task_string": ""}, [("7_0", 0)]),
    ({"job_id": 7, "array_job_id": 7, "array_task_id": None, "array_task_string": "2-5%2"},
     [("7_2", 2), ("7_3", 3), ("7_4", 4), ("7_5", 5)]),
    # 24.11 / 26.05
    ({"job_id": 9, "array_job_id": _n(7), "array_task_id": _n(1), "array_task_string": ""}, [("7_1", 1)]),
    ({"job_id": 7, "array_job_id": _n(7), "array_task_id": _n(0, is_set=False), "array_task_string": "2,4-8:2"},
     [("7_2", 2), ("7_4", 4), ("7_6", 6), ("7_8", 8)]),
])
def test_queue_records_name_their_tasks(item: dict[str, object], keys: list[tuple[str, int]]) -> None:
    part = array_from_queue(item)
    assert part is not None and part.keys == keys
    job = queue_job_from_json({**item, "job_state": "PENDING"})
    assert job.array == part


@pytest.mark.parametrize("item", [{"job_id": 5, "array_job_id": 0}, {"job_id": 5, "array_job_id": _n(0)},
                                  {"job_id": 5}])
def test_plain_jobs_are_no_arrays(item: dict[str, object]) -> None:
    assert array_from_queue(item) is None


def test_sacct_json_pending_record_is_a_bitmap() -> None:
    base = {"state": {"current": ["CANCELLED"]}, "time": {"submission": 1, "end": 2, "elapsed": 0}}
    pending = accounting_job_from_json({**base, "job_id": 193, "array": {
        "job_id": 193, "task_id": _n(0, is_set=False), "task": "0x3C", "limits": {}}})
    assert pending.array == ArrayPart("193", pending=(2, 3, 4, 5))
    task = accounting_job_from_json({**base, "job_id": 8, "array": {"job_id": 7, "task_id": 0, "task": None}})
    assert task.array == ArrayPart("7", task=0)
    plain = accounting_job_from_json({**base, "job_id": 3, "array": {"job_id": 0, "task_id": None}})
    assert plain.array is None


@pytest.mark.parametrize(("text", "part"), [
    ("7_3", ArrayPart("7", task=3)), ("7_[2-5%2]", ArrayPart("7", pending=(2, 3, 4, 5))),
    ("7_[1,3]", ArrayPart("7", pending=(1, 3))), ("7", None), ("7.batch", None), ("x_1", None),
])
def test_sacct_job_id_text(text: str, part: ArrayPart | None) -> None:
    assert parse_job_id_text(text) == part


def test_unreadable_task_lists_stand_for_no_task() -> None:
    assert task_ids_from_text("junk") == () and task_ids_from_text(None) == ()
    assert task_ids_from_bitmap("0xZZ") == () and task_ids_from_bitmap("12") == () and task_ids_from_bitmap(None) == ()
    assert task_ids_from_bitmap("0x5") == (0, 2)


@pytest.mark.parametrize(("array_id", "task", "part"), [
    ("7", "0", ArrayPart("7", task=0)),  # a running task (its own JobID differs)
    ("7", "2-5%2", ArrayPart("7", pending=(2, 3, 4, 5))),  # the record of the pending tasks
    ("7", "1,4,9,16", ArrayPart("7", pending=(1, 4, 9, 16))),  # SLURM_BITSTR_LEN=0: never "..."
    ("7", "5", ArrayPart("7", task=5)),  # one task left pending: the same key 7_5
    ("12", "N/A", None),  # not an array (ArrayJobID is the job id)
    ("12", "", None),
    ("N/A", "3", None),
])
def test_squeue_text_array_fields(array_id: str, task: str, part: ArrayPart | None) -> None:
    assert array_from_queue_text(array_id, task) == part
