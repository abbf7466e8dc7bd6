"""``make audit`` gives a verdict: known-vulnerable releases are reported, and what
cannot be checked is said plainly (against the real PyPI JSON API)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "audit.py"
spec = importlib.util.spec_from_file_location("audit", SCRIPT)
assert spec and spec.loader
audit = importlib.util.module_from_spec(spec)
sys.modules["audit"] = audit  # dataclasses look their module up
spec.loader.exec_module(audit)


@pytest.fixture(scope="module")
def pypi() -> None:
    if audit._get_json(f"{audit.PYPI}/pip/json", 10) is None:
        pytest.skip("PyPI's JSON API is not reachable from here")


def test_a_known_vulnerable_release_is_reported(pypi: None) -> None:
    # pycrypto's last release (2.6.1) carries published advisories (e.g. PYSEC-2018-97)
    result = audit.check_python("pycrypto", "2.6.1", 10)
    assert result.status == "vulnerable" and any(a.startswith(("PYSEC-", "GHSA-")) for a in result.advisories)


def test_what_cannot_be_checked_is_said(pypi: None) -> None:
    result = audit.check_python("pycrypto", "2.0.1", 10)
    assert result.status in {"vulnerable", "unchecked"}  # never "clean" without data for that version
    if result.status == "unchecked":
        assert "latest" in result.detail
    missing = audit.check_python("no-such-package-aifa-broker-test", "1.0", 10)
    assert missing.status == "unchecked"


def test_make_audit_prints_one_verdict(pypi: None) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, check=False)
    verdict = [line for line in proc.stdout.splitlines() if line.startswith("audit verdict:")]
    assert len(verdict) == 1 and "could NOT be checked" in verdict[0], proc.stdout[-2000:]
    assert proc.returncode == (1 if "VULNERABLE" in verdict[0] else 0)
