"""The relative window of a usage read: ``now-N`` … ``now-M`` seconds.

Both Slurm adapters send accounting windows relative to the scheduler's "now"
(``sacct --starttime=now-N``, slurmdb ``start_time=now-Ns``): no time zones, but
the bounds are resolved by the scheduler host's clock, not the broker's. The window
``[since, until]`` is therefore widened by a clock margin on each side and the
records filtered exactly by their end times afterwards.

The margin is paid on *every* read: a window of width w reads w + 2 × margin of
accounting. It used to be five minutes, so the importer's narrowest slice (one
minute) still read eleven minutes, about ten times the records it kept — a burst
that filled the answer cap in those eleven minutes stopped the import for good,
however narrow the slices became. It is now a setting
(``usage_clock_margin_seconds``, default :data:`DEFAULT_CLOCK_MARGIN_SECONDS`):
large enough for hosts kept in time by NTP, small next to a slice.
"""

from __future__ import annotations

import math
from datetime import datetime

#: default clock margin (seconds) added to each side of a usage window
DEFAULT_CLOCK_MARGIN_SECONDS = 60


def relative_window(since: datetime, until: datetime | None, now: datetime,
                    margin_seconds: float) -> tuple[int, int | None]:
    """``(N, M)``: read accounting from ``now-N`` to ``now-M`` seconds (``M`` None:
    up to now) to cover ``[since, until]`` with ``margin_seconds`` on each side; an
    ``until`` within the margin of ``now`` reads up to now."""
    back = math.ceil((now - since).total_seconds() + margin_seconds)
    if until is None:
        return max(1, back), None
    return max(1, back), max(0, math.floor((now - until).total_seconds() - margin_seconds))
