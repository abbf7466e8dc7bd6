"""slurmrestd's answer read one list element at a time (adapters/slurm_rest/stream.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.slurm_rest.stream import ItemStream
from broker.adapter import AdapterError, OutputTooLarge

JOBS = [{"job_id": i, "name": f'n{i} "quoted" [x] {{y}} \\ é', "time": {"end": 1_700_000_000 + i},
         "steps": [{"id": [1, 2]}], "flags": [], "ok": True, "none": None} for i in range(50)]


def _read(text: str, piece: int, *, key: str = "jobs", cap: int = 100_000) -> tuple[list[Any], dict[str, Any]]:
    reader = ItemStream(key, max_item_chars=cap, during="accounting")
    items: list[Any] = []
    for i in range(0, len(text), piece):
        items.extend(reader.feed(text[i:i + piece]))
    return items, reader.finish()


@pytest.mark.parametrize("piece", [1, 7, 64, 4096, 10**7])
@pytest.mark.parametrize("order", ["jobs first", "jobs last"])
def test_every_element_and_every_other_value_whatever_the_pieces(piece: int, order: str) -> None:
    others = {"meta": {"plugin": {"name": "x"}, "slurm": {"version": {"major": 24}}}, "errors": [],
              "warnings": [{"description": "w"}], "count": 12, "flag": False}
    body = {"jobs": JOBS, **others} if order == "jobs first" else {**others, "jobs": JOBS}
    items, rest = _read(json.dumps(body, indent=1 if piece == 7 else None), piece)
    assert items == JOBS and rest == others


def test_an_empty_list_and_an_answer_without_the_list() -> None:
    assert _read('{"jobs": [], "errors": [{"error_number": 9003}]}', 3) == ([], {"errors": [{"error_number": 9003}]})
    assert _read('{"errors": [{"error": "x"}]}', 5) == ([], {"errors": [{"error": "x"}]})
    assert _read('{"jobs": null}', 2) == ([], {"jobs": None})


def test_elements_are_given_as_they_complete() -> None:
    reader = ItemStream("jobs", max_item_chars=1000, during="accounting")
    assert list(reader.feed('{"jobs": [{"a": 1}, {"b"')) == [{"a": 1}]
    assert list(reader.feed(': 2}]')) == [{"b": 2}]
    assert list(reader.feed("}")) == [] and reader.finish() == {}


def test_one_element_past_the_cap_is_too_large_not_held() -> None:
    text = json.dumps({"jobs": [{"a": "x" * 5000}]})
    with pytest.raises(OutputTooLarge):
        _read(text, 100, cap=1000)
    items, _ = _read(json.dumps({"jobs": [{"a": "x" * 500}] * 40}), 100, cap=1000)  # many small ones: fine
    assert len(items) == 40


@pytest.mark.parametrize("text", ['{"jobs": [{"a": 1}, {"b": 2', '{"jobs": [{"a": 1}]', "", "[1, 2]",
                                  '{"jobs": [{"a": 1}]} trailing', '{"jobs" [1]}'])
def test_a_truncated_or_malformed_answer_is_a_bad_response(text: str) -> None:
    with pytest.raises(AdapterError) as exc:
        _read(text, 4)
    assert exc.value.code == "bad_response" and exc.value.transient
