"""Adapter instances per cluster, built from the cluster's row through the plugin
loader and cached until the cluster's definition changes."""

from __future__ import annotations

import logging
import threading
from typing import Any

from broker import plugins
from broker.adapter import AdapterConfigError, ClusterAdapter
from broker.config import Settings
from broker.metrics import ADAPTER_LATENCY, timed_adapter_call

log = logging.getLogger(__name__)


class AdapterRegistry:
    """Thread-safe cache: cluster name → adapter instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._adapters: dict[str, tuple[tuple[Any, ...], ClusterAdapter]] = {}

    def get(self, *, name: str, adapter: str, connection: dict[str, Any]) -> ClusterAdapter:
        """The adapter for cluster ``name`` (built on first use or after a change)."""
        fingerprint = (adapter, repr(sorted(connection.items())))
        with self._lock:
            cached = self._adapters.get(name)
            if cached and cached[0] == fingerprint:
                return cached[1]
            instance = self.build(name=name, adapter=adapter, connection=connection)
            if cached:
                _close_quietly(cached[1])
            self._adapters[name] = (fingerprint, instance)
            return instance

    def build(self, *, name: str, adapter: str, connection: dict[str, Any]) -> ClusterAdapter:
        """A new adapter instance; refuses dev-only adapters in production unless allowed."""
        try:
            cls = plugins.load_adapter_class(adapter)
        except plugins.PluginError as exc:
            raise AdapterConfigError(str(exc)) from exc
        if getattr(cls, "runs_as_broker_user", False) and self.settings.mode == "production" \
                and not self.settings.allow_local_adapter_in_production:
            raise AdapterConfigError(
                f"adapter {adapter!r} runs jobs as the broker's own OS user (development only); "
                "it is refused in production unless allow_local_adapter_in_production is set")
        instance: ClusterAdapter = cls(name, connection, data_dir=str(self.settings.data_dir))
        timed_adapter_call(instance, ADAPTER_LATENCY)
        return instance

    def forget(self, name: str) -> None:
        with self._lock:
            cached = self._adapters.pop(name, None)
        if cached:
            _close_quietly(cached[1])

    def close(self) -> None:
        with self._lock:
            items = list(self._adapters.values())
            self._adapters.clear()
        for _, inst in items:
            _close_quietly(inst)


def _close_quietly(adapter: ClusterAdapter) -> None:
    try:
        adapter.close()
    except Exception:  # closing must never break a request
        log.warning("closing adapter %s failed", adapter.name, exc_info=True)
