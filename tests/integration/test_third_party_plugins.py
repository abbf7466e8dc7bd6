"""A site plugs in its own adapter and policy without touching the core: the example
packages in tests/plugins/ are pip-installed (into a temporary directory put on
PYTHONPATH of child processes — the test venv stays as it was), ``aifa-broker
plugins`` lists them with their versions, the adapter passes the contract suite, the
policy takes part in the eligibility chain, and a broken plugin is reported while
every other plugin still loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "tests" / "plugins"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def site_packages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    target = tmp_path_factory.mktemp("site-plugins")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target),
         str(PLUGINS / "example_adapter"), str(PLUGINS / "example_policy"), str(PLUGINS / "broken_plugin")],
        capture_output=True, text=True, timeout=240, check=False, cwd=target)
    assert done.returncode == 0, done.stderr
    yield target


def _env(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIFA_")}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{ROOT}", AIFA_BROKER_DATA_DIR=str(site.parent / "data"), **extra)
    return env


def test_plugins_command_lists_the_site_packages_and_reports_the_broken_one(site_packages: Path) -> None:
    done = subprocess.run([str(BIN / "aifa-broker"), "plugins", "--json"], capture_output=True, text=True,
                          env=_env(site_packages), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(done.stdout)}
    site = rows[("adapter", "example_site")]
    assert (site["distribution"], site["version"], site["ok"]) == ("aifa-example-adapter", "1.2.0", True)
    policy = rows[("policy", "example_gpu_cap")]
    assert (policy["distribution"], policy["version"], policy["ok"]) == ("aifa-example-policy", "0.3.1", True)
    broken = rows[("adapter", "example_broken")]
    assert broken["ok"] is False and "aifa_no_such_dependency" in broken["error"]
    # one broken plugin breaks nothing else
    assert all(r["ok"] for key, r in rows.items() if key != ("adapter", "example_broken"))
    assert {("adapter", "local"), ("adapter", "slurm_ssh"), ("policy", "project_active")} <= set(rows)
    text = subprocess.run([str(BIN / "aifa-broker"), "plugins"], capture_output=True, text=True,
                          env=_env(site_packages), timeout=60, check=False)
    assert text.returncode == 0 and "BROKEN: ModuleNotFoundError" in text.stdout


def test_the_site_adapter_passes_the_contract_suite(site_packages: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/contract", "-q", "-p", "no:cacheprovider", "-k", "plugin-example_site"],
        capture_output=True, text=True, cwd=ROOT, timeout=240, check=False,
        env=_env(site_packages, AIFA_CONTRACT_PLUGIN="example_site"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


POLICY_CHECK = textwrap.dedent("""
    import json
    from datetime import date
    from broker.policy import AccessModeLimits, EligibilityContext, JobRequestView, ProjectView
    from broker.services.eligibility import load_chain

    chain = load_chain(["project_active", "example_gpu_cap"])
    def ctx(mode, gpus):
        return EligibilityContext(
            today=date.today(), user="alice", allocation=None, allocations_on_cluster_exist=False,
            project=ProjectView("P-1", "active", mode, None, None), cluster_account="alice",
            request=JobRequestView("c", "gpu", 1, 1, 1, gpus, None, 10), limits=AccessModeLimits(),
            active_jobs_user=0, active_jobs_project=0)
    out = {}
    for mode, gpus in (("playground", 4), ("playground", 2), ("large-scale", 4)):
        denials = [d for p in chain if (d := p.check(ctx(mode, gpus)))]
        out[f"{mode}/{gpus}"] = [d.code for d in denials]
    print(json.dumps(out))
""")


def test_the_site_policy_joins_the_eligibility_chain(site_packages: Path) -> None:
    done = subprocess.run([sys.executable, "-c", POLICY_CHECK], capture_output=True, text=True,
                          env=_env(site_packages), timeout=60, check=False, cwd=site_packages)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"playground/4": ["limit_exceeded"], "playground/2": [],
                                       "large-scale/4": []}


def test_the_test_venv_stays_clean(site_packages: Path) -> None:
    from importlib.metadata import entry_points

    assert "example_site" not in {ep.name for ep in entry_points(group="aifa_broker.adapters")}
