"""The exhaustion forecast never computes a date out of range: property tests over
extreme grants, burn rates and dates (issue: a 1,000 core-hour grant with one
1-second job made every quota view answer 500 with OverflowError)."""

from __future__ import annotations

import math
from datetime import date, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.models import Allocation, Cluster, Project
from broker.services.usage import FORECAST_HORIZON_DAYS, _summary, forecast

MAX_MICRO = 2**63 - 1
amounts = st.integers(min_value=-MAX_MICRO, max_value=MAX_MICRO)
rates = st.one_of(st.floats(min_value=0, max_value=1e300, allow_nan=False),
                  st.sampled_from([0.0, 5e-324, 1e-300, 1.0, float(MAX_MICRO), math.inf]))
days = st.dates(min_value=date.min, max_value=date.max)


@settings(max_examples=2000, deadline=None)
@given(day=days, granted=amounts, remaining=amounts, per_day=rates, end=st.one_of(st.none(), days))
def test_forecast_is_total_and_consistent(day: date, granted: int, remaining: int, per_day: float,
                                          end: date | None) -> None:
    f = forecast(day=day, granted=granted, remaining=remaining, per_day=per_day, end=end)
    assert f.status in {"exhausted", "before_end", "not_before_end", "not_burning", "beyond_horizon"}
    if f.status == "before_end":
        assert f.exhaustion is not None and day <= f.exhaustion
        assert (f.exhaustion - day).days == int(remaining / per_day) <= FORECAST_HORIZON_DAYS
        assert end is None or f.exhaustion < end
    elif f.status == "exhausted":
        assert remaining <= 0 and f.exhaustion == (day if granted > 0 else None)
    else:
        assert f.exhaustion is None
    if f.status == "not_before_end":
        assert end is not None and remaining / per_day >= (end - day).days


def test_tiny_burn_on_a_large_grant_is_not_before_the_end() -> None:
    day = date(2026, 11, 30)
    # 1,000 core-hours granted, one 1-second job burnt (in micro-units): ~10 million years
    f = forecast(day=day, granted=1000 * 10**6, remaining=1000 * 10**6 - 278, per_day=278 / 14,
                 end=date(2027, 6, 30))
    assert (f.exhaustion, f.status) == (None, "not_before_end")
    assert forecast(day=day, granted=10**9, remaining=10**9, per_day=1e-3, end=None).status == "beyond_horizon"
    f = forecast(day=day, granted=100, remaining=50, per_day=10, end=date(2027, 1, 1))
    assert (f.exhaustion, f.status) == (day + timedelta(days=5), "before_end")
    assert forecast(day=day, granted=100, remaining=50, per_day=1, end=day + timedelta(days=50)).status \
        == "not_before_end"


@settings(max_examples=500, deadline=None)
@given(granted=st.integers(min_value=0, max_value=MAX_MICRO // 4),
       charged=st.integers(min_value=0, max_value=MAX_MICRO // 4),
       reserved=st.integers(min_value=0, max_value=MAX_MICRO // 4),
       burned=st.integers(min_value=0, max_value=MAX_MICRO // 4),
       start=st.one_of(st.none(), days), end=st.one_of(st.none(), days),
       day=st.dates(min_value=date(1900, 1, 1), max_value=date(2200, 12, 31)),
       window=st.integers(min_value=1, max_value=365))
def test_portfolio_row_never_raises(granted: int, charged: int, reserved: int, burned: int,
                                    start: date | None, end: date | None, day: date, window: int) -> None:
    alloc = Allocation(id=1, project_id=1, cluster_id=1, unit="core_hours", granted=granted, charged=charged,
                       reserved=reserved, account="a", start_date=start, end_date=end)
    row = _summary(alloc, Project(id=1, code="P", title="t"), Cluster(id=1, name="c", adapter="local"),
                   burned, day, window, 0.5)
    assert row["overdrawn"] is (charged > granted)
    if row["projected_exhaustion"] is not None:
        assert date.fromisoformat(row["projected_exhaustion"]) >= day
