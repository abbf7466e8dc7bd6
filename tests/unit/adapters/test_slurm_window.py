"""The relative window of a usage read (adapters.slurm_common.window)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from adapters.slurm_common.window import relative_window

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("since_ago", "until_ago", "margin", "expected"),
    [
        (3600, None, 60, (3660, None)),  # open-ended: up to now
        (3600, 600, 60, (3660, 540)),  # widened by the margin on each side
        (3600, 30, 60, (3660, 0)),  # an end within the margin of now: up to now
        (120, 60, 5, (125, 55)),  # one minute reads 70 s, not 11 minutes
        (60.4, 59.6, 1, (62, 58)),  # fractions widen, never narrow
        (0, None, 0, (1, None)),  # never an empty look-back
    ],
)
def test_relative_window(since_ago: float, until_ago: float | None, margin: float,
                         expected: tuple[int, int | None]) -> None:
    until = None if until_ago is None else NOW - timedelta(seconds=until_ago)
    assert relative_window(NOW - timedelta(seconds=since_ago), until, NOW, margin) == expected


def test_a_narrow_window_reads_width_plus_twice_the_margin() -> None:
    """What a slice costs: the read spans its width plus the margin twice."""
    since = NOW - timedelta(minutes=30)
    back, until_back = relative_window(since, since + timedelta(minutes=1), NOW, 60)
    assert until_back is not None and back - until_back == 60 + 2 * 60
