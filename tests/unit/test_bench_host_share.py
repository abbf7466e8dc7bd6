"""bench.harness.host_share: how the host's CPU time went during a benchmark (steal flagged)."""

from bench.harness import cpu_times, host_share


def test_steal_busy_and_idle_are_shares_of_the_interval() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    before = [100, 0, 50, 1000, 10, 0, 0, 20, 0, 0]
    after = [400, 0, 150, 1300, 10, 0, 0, 220, 0, 0]  # +300 user +100 sys +300 idle +200 steal
    assert host_share(before, after) == {"busy_pct": 44.4, "idle_pct": 33.3, "steal_pct": 22.2}


def test_a_quiet_interval_has_no_steal() -> None:
    before = [0, 0, 0, 0, 0, 0, 0, 0]
    after = [50, 0, 50, 100, 0, 0, 0, 0]
    assert host_share(before, after)["steal_pct"] == 0.0


def test_missing_counters_give_no_figure() -> None:
    assert host_share([], [1, 2, 3]) == {}


def test_this_host_reports_its_counters() -> None:
    first, second = cpu_times(), cpu_times()
    assert len(first) >= 8
    assert all(b >= a for a, b in zip(first, second, strict=False))
