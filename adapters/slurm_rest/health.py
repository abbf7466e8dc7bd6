"""The live health check: slurmrestd reachable, slurmctld answering ping,
slurmdbd answering through slurmrestd. Never raises."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from broker.adapter import AdapterError, Health

if TYPE_CHECKING:
    from adapters.slurm_rest.adapter import SlurmRestAdapter
    from adapters.slurm_rest.layers import ApiLayer

log = logging.getLogger("adapters.slurm_rest")


def check_health(adapter: SlurmRestAdapter) -> Health:
    """Health of the cluster behind ``adapter``; any failure becomes ``ok=False``."""
    started = time.perf_counter()
    checks: dict[str, Any] = {"url": adapter.config.url}
    if adapter.config.slurm_release:
        checks["slurm_release_hint"] = adapter.config.slurm_release
    try:
        ok, detail = _check(adapter, checks)
    except AdapterError as exc:
        ok, detail = False, f"{exc.code}: {exc}"
    except Exception as exc:  # a health check must never raise
        log.exception("slurm_rest %s: health check failed unexpectedly", adapter.name)
        ok, detail = False, f"unexpected error: {type(exc).__name__}: {exc}"
    latency_ms = (time.perf_counter() - started) * 1000
    return Health(ok=ok, detail=detail, latency_ms=round(latency_ms, 2), checks=checks)


def _check(adapter: SlurmRestAdapter, checks: dict[str, Any]) -> tuple[bool, str]:
    user = adapter.config.query_username
    if not user:
        status = adapter.probe()
        checks["http_status"] = status
        return True, (f"slurmrestd answers (HTTP {status}); set query_username for a slurmctld/slurmdbd check")
    layer = adapter.api(user)
    found = adapter.discovery
    checks["api_version"] = layer.version
    if found is not None:
        checks["served_versions"] = list(found.served)
        if found.slurm_release:
            checks["slurm_release"] = found.slurm_release
    ctld_ok = _ping(adapter, layer, user, checks)
    db_ok = _accounting(adapter, layer, user, checks)
    if ctld_ok and db_ok:
        return True, f"slurmctld and slurmdbd answer ({layer.version})"
    parts = [name for name, good in (("slurmctld", ctld_ok), ("slurmdbd", db_ok)) if not good]
    return False, f"{' and '.join(parts)} not answering ({layer.version})"


def _ping(adapter: SlurmRestAdapter, layer: ApiLayer, user: str, checks: dict[str, Any]) -> bool:
    body = adapter.get(layer.ping_path, username=user, during="ping")
    pings = [layer.parse_ping(item) for item in layer.items(body, "pings")]
    checks["slurmctld"] = [{"host": p.hostname, "up": p.up, "latency_us": p.latency_us} for p in pings]
    return any(p.up for p in pings)


def _accounting(adapter: SlurmRestAdapter, layer: ApiLayer, user: str, checks: dict[str, Any]) -> bool:
    try:
        adapter.get(layer.db_health_path, username=user, during="slurmdbd check")
    except AdapterError as exc:
        checks["slurmdbd"] = f"{exc.code}: {exc}"
        return False
    checks["slurmdbd"] = "ok"
    return True
