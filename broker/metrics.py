"""Prometheus metrics. Label sets are bounded: no job ids, no user names.

Counters and histograms are per process; gauges about allocations and jobs are
computed from the database at scrape time by :class:`DatabaseCollector`, so every
API replica reports the same values and a scrape never calls a scheduler.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

REGISTRY = CollectorRegistry(auto_describe=True)

SUBMISSIONS = Counter(
    "aifa_jobs_submitted_total", "Jobs accepted and sent to a cluster", ["cluster"], registry=REGISTRY
)
DENIALS = Counter(
    "aifa_jobs_denied_total", "Submissions refused, by reason code", ["reason"], registry=REGISTRY
)
SUBMIT_ERRORS = Counter(
    "aifa_submit_errors_total", "Submissions a cluster refused or could not take", ["cluster", "code"],
    registry=REGISTRY,
)
ADAPTER_LATENCY = Histogram(
    "aifa_adapter_call_seconds", "Adapter call latency", ["adapter", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY,
)
TRACKER_CYCLE = Histogram(
    "aifa_tracker_cycle_seconds", "Duration of one tracker cycle for one cluster", ["cluster"],
    registry=REGISTRY,
)
SETTLEMENTS = Counter(
    "aifa_jobs_settled_total", "Jobs settled (reservation released, usage charged)", ["state"],
    registry=REGISTRY,
)
USAGE_IMPORT_STUCK = Counter(
    "aifa_usage_import_stuck_total", "Usage-import cycles that could not read the next accounting window "
    "in any piece (too large even at the narrowest window and one account, and the adapter cannot stream it, "
    "or one record is past its cap): raise the adapter's cap",
    ["cluster"], registry=REGISTRY,
)
USAGE_IMPORT_SPLITS = Counter(
    "aifa_usage_import_account_splits_total", "Accounting windows too large at the narrowest span, "
    "read per subset of accounts instead", ["cluster"], registry=REGISTRY,
)
USAGE_IMPORT_STREAMS = Counter(
    "aifa_usage_import_streamed_total", "Accounting windows of one account too large for one answer even at "
    "the narrowest span, read as a stream (the adapter's iter_usage)", ["cluster"], registry=REGISTRY,
)
RATE_LIMIT_STORE_ERRORS = Counter(
    "aifa_rate_limit_store_errors_total",
    "Submissions let through because the shared rate-limit store did not answer", registry=REGISTRY,
)

def process_registry() -> CollectorRegistry:
    """What ``/metrics`` exposes of this process's counters: :data:`REGISTRY`, or in
    prometheus-client's multiprocess mode (``serve --workers N``) the sums over
    every process's files."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    merged = CollectorRegistry(auto_describe=True)
    multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    return merged


REQUESTS_SHED = Counter(
    "aifa_http_requests_shed_total", "Requests answered 503 at once because the process was at its "
    "limit of requests in flight", registry=REGISTRY,
)

_TIMED = ("submit", "poll", "cancel", "find_by_tag", "usage", "read_output", "health", "discover")


def timed_adapter_call(adapter: Any, histogram: Histogram) -> Any:
    """Wrap the adapter's public methods so each call's latency is observed."""
    kind = type(adapter).__name__
    for method in _TIMED:
        original = getattr(adapter, method, None)
        if original is not None:
            setattr(adapter, method, _timer(original, histogram.labels(kind, method)))
    return adapter


def _timer(fn: Callable[..., Any], child: Any) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            child.observe(time.perf_counter() - start)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    wrapper.__doc__ = fn.__doc__
    return wrapper


class DatabaseCollector(Collector):
    """Allocation balances, jobs by state, cluster health and tracker lag, notifications
    and webhook deliveries — all read from the database at scrape time (a few
    aggregate queries; never a scheduler call), so every replica reports the same.

    Allocation gauges are summed per (project, cluster, unit): a project with two
    allocations of one unit on one cluster (e.g. successive periods) is one series.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["project", "cluster", "unit"]
        fams = {
            name: GaugeMetricFamily(f"aifa_allocation_{name}", f"Allocation {name} (units)", labels=labels)
            for name in ("granted", "used", "reserved", "remaining")
        }
        ends = GaugeMetricFamily("aifa_allocation_end_timestamp_seconds",
                                 "Latest end date of the allocations (Unix time, 00:00 UTC after the last day)",
                                 labels=labels)
        jobs = GaugeMetricFamily("aifa_jobs", "Jobs by state and cluster", labels=["cluster", "state"])
        up = GaugeMetricFamily("aifa_cluster_up", "1 when the last health check or poll succeeded",
                               labels=["cluster"])
        online = GaugeMetricFamily("aifa_cluster_online", "1 when the cluster is administratively online "
                                   "(0: draining or offline)", labels=["cluster"])
        unreachable = GaugeMetricFamily("aifa_cluster_unreachable_seconds",
                                        "Seconds since the cluster stopped answering (0 when reachable)",
                                        labels=["cluster"])
        lag = GaugeMetricFamily("aifa_tracker_lag_seconds", "Seconds since the cluster was last polled "
                                "(clusters not offline)", labels=["cluster"])
        drift = GaugeMetricFamily("aifa_enforcement_drift", "Changes the last Slurm enforcement check found "
                                  "between the broker's allocations and Slurm's accounting (0: in sync)",
                                  labels=["cluster"])
        sync_err = GaugeMetricFamily("aifa_enforcement_sync_failed", "1 when the last enforcement sync failed",
                                     labels=["cluster"])
        import_lag = GaugeMetricFamily("aifa_usage_import_lag_seconds", "Seconds since the end of the last "
                                       "job the usage import handled (its watermark; clusters not offline): "
                                       "grows while the import is stuck, and while no job ends", labels=["cluster"])
        notes = GaugeMetricFamily("aifa_notifications", "Threshold crossings and expiry warnings recorded",
                                  labels=["kind"])
        deliveries = GaugeMetricFamily("aifa_webhook_deliveries", "Webhook deliveries by status",
                                       labels=["status"])
        with self.engine.connect() as conn:
            for code, cluster, unit, granted, charged, reserved, end in conn.execute(sa.text(
                "SELECT p.code, c.name, a.unit, SUM(a.granted), SUM(a.charged), SUM(a.reserved), MAX(a.end_date) "
                "FROM allocations a JOIN projects p ON p.id = a.project_id JOIN clusters c ON c.id = a.cluster_id "
                "GROUP BY p.code, c.name, a.unit"
            )):
                granted, charged, reserved = int(granted or 0), int(charged or 0), int(reserved or 0)
                values = {"granted": granted, "used": charged, "reserved": reserved,
                          "remaining": granted - charged - reserved}
                for name, value in values.items():
                    fams[name].add_metric([code, cluster, unit], value / 1_000_000)
                if end is not None:
                    ends.add_metric([code, cluster, unit], _day_end_epoch(end))
            for cluster, state, count in conn.execute(sa.text(
                "SELECT c.name, j.state, COUNT(*) FROM jobs j JOIN clusters c ON c.id = j.cluster_id "
                "GROUP BY c.name, j.state"
            )):
                jobs.add_metric([cluster, state], count)
            now = time.time()
            for name, state, ok, last_poll, down_since, imported in conn.execute(sa.text(
                "SELECT name, state, health_ok, last_poll_at, unreachable_since, usage_imported_until FROM clusters"
            )):
                up.add_metric([name], 1.0 if ok else 0.0)
                if imported is not None and state != "offline":
                    import_lag.add_metric([name], max(0.0, now - _epoch(imported)))
                online.add_metric([name], 1.0 if state == "online" else 0.0)
                unreachable.add_metric([name], max(0.0, now - _epoch(down_since)) if down_since else 0.0)
                if last_poll is not None and state != "offline":
                    lag.add_metric([name], max(0.0, now - _epoch(last_poll)))
            for name, status in conn.execute(sa.text(
                "SELECT name, enforcement_status FROM clusters WHERE enforce_budgets"
            )):
                info = _json(status)
                drift.add_metric([name], float(info.get("drift") or 0))
                sync_err.add_metric([name], 1.0 if info.get("error") else 0.0)
            for kind, count in conn.execute(sa.text("SELECT kind, COUNT(*) FROM notifications GROUP BY kind")):
                notes.add_metric([kind], count)
            for status, count in conn.execute(sa.text(
                "SELECT status, COUNT(*) FROM webhook_deliveries GROUP BY status"
            )):
                deliveries.add_metric([status], count)
        yield from fams.values()
        yield from (ends, jobs, up, online, unreachable, lag, import_lag, drift, sync_err, notes, deliveries)


def _json(value: Any) -> dict[str, Any]:
    """A JSON column read through plain SQL: a dict (PostgreSQL) or its text (SQLite)."""
    import json

    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {}


def _day_end_epoch(value: Any) -> float:
    """A DATE column value (date or ISO string) → Unix time of the following midnight UTC."""
    from datetime import UTC, date, datetime, time, timedelta

    day = date.fromisoformat(value[:10]) if isinstance(value, str) else value
    return datetime.combine(day + timedelta(days=1), time.min, UTC).timestamp()


def _epoch(value: Any) -> float:
    from datetime import UTC, datetime

    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())
