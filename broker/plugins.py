"""Find adapters and policies by name through entry points.

The core never imports a concrete plugin. A plugin whose import fails (missing
optional dependency such as ``pyslurm``) is recorded, and the failure is raised
only when that plugin is asked for, so one broken plugin never stops the broker.

Exceptions: :class:`PluginNotFound` (no such name), :class:`PluginLoadError`
(the plugin exists but could not be imported; ``__cause__`` is the import error).
"""

from __future__ import annotations

import threading
from importlib.metadata import EntryPoint, entry_points
from typing import Any

ADAPTER_GROUP = "aifa_broker.adapters"
POLICY_GROUP = "aifa_broker.policies"

_lock = threading.Lock()
_cache: dict[tuple[str, str], Any] = {}
_failures: dict[tuple[str, str], BaseException] = {}


class PluginError(Exception):
    """Base of plugin lookup errors."""


class PluginNotFound(PluginError):
    """No plugin of that name is installed in the group."""


class PluginLoadError(PluginError):
    """The plugin is installed but importing it failed."""


def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available(group: str) -> list[str]:
    """Names installed in ``group`` (whether or not they import)."""
    return sorted(_entry_points(group))


def load(group: str, name: str) -> Any:
    """Return the object behind plugin ``name`` of ``group``, importing it once."""
    key = (group, name)
    with _lock:
        if key in _cache:
            return _cache[key]
        if key in _failures:
            raise PluginLoadError(f"plugin {name!r} ({group}) failed to import") from _failures[key]
        eps = _entry_points(group)
        if name not in eps:
            known = ", ".join(sorted(eps)) or "none"
            raise PluginNotFound(f"no plugin {name!r} in {group} (installed: {known})")
        try:
            obj = eps[name].load()
        except Exception as exc:  # recorded and re-raised on each request for it
            _failures[key] = exc
            raise PluginLoadError(f"plugin {name!r} ({group}) failed to import: {exc}") from exc
        _cache[key] = obj
        return obj


def load_adapter_class(name: str) -> Any:
    """The adapter class registered as ``name``."""
    return load(ADAPTER_GROUP, name)


def load_policy_class(name: str) -> Any:
    """The eligibility policy class registered as ``name``."""
    return load(POLICY_GROUP, name)
