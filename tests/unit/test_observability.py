"""deploy/observability: alert rules pass promtool and fire as intended; the Grafana
dashboard and provisioning files are well-formed."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.support.tools import ROOT, SETUP_HINT, promtool

OBS = ROOT / "deploy" / "observability"
RULES = OBS / "prometheus" / "alerts.yml"


def _promtool() -> str:
    tool = promtool()
    if tool is None:
        pytest.skip(f"promtool is not installed ({SETUP_HINT}: it extracts it from Debian's prometheus package)")
    return tool


def test_promtool_check_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests() -> None:
    result = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], capture_output=True, text=True,
                            timeout=60, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist() -> None:
    doc = yaml.safe_load(RULES.read_text())
    names = {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert {"AifaAllocationNearlySpent", "AifaClusterDown", "AifaTrackerLagging",
            "AifaSubmissionErrorRate"} <= names


def test_grafana_dashboard_and_provisioning_are_well_formed() -> None:
    dash = json.loads((OBS / "grafana" / "dashboards" / "aifa-broker.json").read_text())
    assert dash["uid"] == "aifa-broker" and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert re.search(r"\baifa_[a-z_]+", target["expr"]), target["expr"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "project", "cluster"} <= variables
    for path in (OBS / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1, path


def metric_names_used_by_observability() -> set[str]:
    """Every ``aifa_*`` name the alert rules and the Grafana dashboard query."""
    text = RULES.read_text() + (OBS / "grafana" / "dashboards" / "aifa-broker.json").read_text()
    return set(re.findall(r"\baifa_[a-z_]+", text))
