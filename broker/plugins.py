"""Find adapters and policies by name through entry points.

The core never imports a concrete plugin. A plugin whose import fails (missing
optional dependency such as ``pyslurm``) is recorded, and the failure is raised
only when that plugin is asked for, so one broken plugin never stops the broker.

Exceptions: :class:`PluginNotFound` (no such name), :class:`PluginLoadError`
(the plugin exists but could not be imported; ``__cause__`` is the import error).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

ADAPTER_GROUP = "aifa_broker.adapters"
POLICY_GROUP = "aifa_broker.policies"

_lock = threading.Lock()
_cache: dict[tuple[str, str], Any] = {}
_failures: dict[tuple[str, str], BaseException] = {}
_registered: set[tuple[str, str]] = set()


class PluginError(Exception):
    """Base of plugin lookup errors."""


class PluginNotFound(PluginError):
    """No plugin of that name is installed in the group."""


class PluginLoadError(PluginError):
    """The plugin is installed but importing it failed."""


def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available(group: str) -> list[str]:
    """Names installed in ``group`` (whether or not they import), and those
    :func:`register`-ed in this process."""
    with _lock:
        registered = {name for (g, name) in _registered if g == group}
    return sorted(set(_entry_points(group)) | registered)


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


def register(group: str, name: str, obj: Any) -> None:
    """Make ``obj`` plugin ``name`` of ``group`` in this process only, without an entry
    point (benchmarks and tests: e.g. a stand-in adapter that answers at once)."""
    with _lock:
        _cache[(group, name)] = obj
        _registered.add((group, name))
        _failures.pop((group, name), None)


def load_adapter_class(name: str) -> Any:
    """The adapter class registered as ``name``."""
    return load(ADAPTER_GROUP, name)


def load_policy_class(name: str) -> Any:
    """The eligibility policy class registered as ``name``."""
    return load(POLICY_GROUP, name)


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin as ``aifa-broker plugins`` reports it."""

    kind: str
    name: str
    target: str
    distribution: str
    version: str
    ok: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def inventory() -> list[PluginInfo]:
    """Every adapter and policy entry point, imported once to learn its status.

    A plugin whose import fails is listed with the error (never raised)."""
    out: list[PluginInfo] = []
    for kind, group in (("adapter", ADAPTER_GROUP), ("policy", POLICY_GROUP)):
        for name, ep in sorted(_entry_points(group).items()):
            dist = getattr(ep, "dist", None)
            error: str | None = None
            try:
                load(group, name)
            except PluginError as exc:
                cause = exc.__cause__
                error = f"{type(cause).__name__}: {cause}" if cause else str(exc)
            out.append(PluginInfo(kind=kind, name=name, target=ep.value,
                                  distribution=dist.metadata["Name"] if dist else "?",
                                  version=dist.version if dist else "?", ok=error is None, error=error))
    return out
