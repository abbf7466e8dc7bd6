"""Locating the external tools some tests need (installed by scripts/setup-test-deps.sh)."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUP_HINT = "run scripts/setup-test-deps.sh"


def promtool() -> str | None:
    """Path of promtool (PATH, or .tools/bin where the setup script extracts it)."""
    found = shutil.which("promtool")
    if found:
        return found
    local = ROOT / ".tools" / "bin" / "promtool"
    return str(local) if local.is_file() else None


def chromium() -> str | None:
    """Debian's chromium binary."""
    path = Path("/usr/bin/chromium")
    return str(path) if path.is_file() else None


def node() -> str | None:
    return shutil.which("node")
