"""Contract target: an adapter from a separately installed package, found by entry point.

Set ``AIFA_CONTRACT_PLUGIN`` to the adapter's entry-point name (and optionally
``AIFA_CONTRACT_PLUGIN_SETTINGS`` to its ``connection`` table as JSON; default: the
local target's settings). tests/integration/test_third_party_plugins.py runs the
suite this way against the example package in tests/plugins/. Without the variable
there is no target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from broker import plugins
from broker.adapter import ClusterAdapter, SchedulerJobRef
from tests.contract.factory_local import SETTINGS, drain_local_jobs
from tests.contract.target import ContractTarget


def make_plugin_target(name: str) -> ContractTarget:
    """The adapter registered as ``name`` in ``aifa_broker.adapters``, on a temporary data dir."""
    cls: Any = plugins.load_adapter_class(name)
    settings = json.loads(os.environ.get("AIFA_CONTRACT_PLUGIN_SETTINGS") or "null") or SETTINGS
    data_dir = tempfile.mkdtemp(prefix=f"aifa-contract-{name}-")
    blocker = Path(data_dir) / "a-file"
    blocker.write_text("a regular file: nothing can be created below it")

    class Disposable(cls):  # type: ignore[misc, valid-type]
        def close(self) -> None:
            if hasattr(self, "_job_ids"):
                drain_local_jobs(self, [SchedulerJobRef(job_id=j, username="alice") for j in self._job_ids()])
            shutil.rmtree(data_dir, ignore_errors=True)
            super().close()

    def unreachable() -> ClusterAdapter:
        return cls(name, settings, data_dir=str(blocker / "data"))  # type: ignore[no-any-return]

    return ContractTarget(adapter=Disposable(name, settings, data_dir=data_dir), unreachable=unreachable,
                          settle_timeout=20.0)


def targets() -> list[object]:
    name = os.environ.get("AIFA_CONTRACT_PLUGIN")
    if not name:
        return []
    return [pytest.param(lambda: make_plugin_target(name), id=f"plugin-{name}")]
