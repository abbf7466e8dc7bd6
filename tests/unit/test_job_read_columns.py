"""How the job reads turn stored column values into answer data (broker/services/jobs.py):
the same data ``json.loads`` and pydantic's datetime serialisation give."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pydantic_core

from broker.services.jobs import _json, _utc


def test_json_columns_read_as_json_loads_reads_them_even_what_pydantic_core_refuses() -> None:
    for text in ('{"a": [1, 2.5, null, true], "b": {"c": "naïve ✓"}, "n": 123456789012345678901234567890}',
                 '{"lone": "\\ud800"}', "null", None):
        assert _json(text) == (None if text is None else json.loads(text))


def test_timestamps_are_written_as_pydantic_writes_the_aware_utc_value() -> None:
    for naive in (datetime(2026, 1, 2, 3, 4, 5), datetime(2026, 1, 2, 3, 4, 5, 6), datetime(1, 1, 1)):
        assert json.dumps(_utc(naive)).encode() == pydantic_core.to_json(naive.replace(tzinfo=UTC))
    assert _utc(None) is None
