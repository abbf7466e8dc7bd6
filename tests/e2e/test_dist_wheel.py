"""The documented pip install: ``make dist`` in a clean checkout → a wheel → a fresh
virtualenv → ``aifa-broker db upgrade``, ``cluster add`` (Slurm 22.05, live
discovery through the installed adapter), ``serve`` with the dashboard's assets.

Slurm-marked (release in the id) so it runs in the 22.05 test process, beside the
image tests, not in the longer non-Slurm one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.support import slurm
from tests.support.podman import clean_checkout
from tests.support.server import free_port, wait_ready

RELEASE = "22.05"
pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("release", [RELEASE], ids=lambda r: f"slurm-{r}")
def test_wheel_from_make_dist_installs_and_runs(release: str, tmp_path: Path) -> None:
    slurm.require_cluster(release)
    checkout = clean_checkout(tmp_path / "checkout")
    start = time.monotonic()
    subprocess.run(["make", "dist", f"PYTHON={sys.executable}"], cwd=checkout, check=True, capture_output=True,
                   timeout=300)
    (wheel,) = (checkout / "dist").glob("aifa_broker-*.whl")
    version = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]["version"]
    assert wheel.name == f"aifa_broker-{version}-py3-none-any.whl"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[postgres]"], check=True,
                   capture_output=True, timeout=600)
    print(f"\nmake dist + pip install: {time.monotonic() - start:.0f} s")
    bin_ = str(venv / "bin" / "aifa-broker")
    # the installed package runs from the venv, not from this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import broker; print(broker.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert str(venv) in where
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIFA_BROKER_")}
    env.update(AIFA_BROKER_DATA_DIR=str(tmp_path / "data"), AIFA_BROKER_REGISTER_LOCAL_CLUSTER="false")

    def cli(*args: str) -> str:
        done = subprocess.run([bin_, *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "migrated to the newest revision" in cli("db", "upgrade")
    assert "up to date" in cli("db", "upgrade")
    definition = slurm.DEV / "generated" / release / "slurm_rest.toml"
    cli("cluster", "add", "--from-file", str(definition))
    assert "dev2205-rest" in cli("cluster", "list")
    assert "ledger consistent" in cli("ledger", "check")
    port = free_port()
    proc = subprocess.Popen([bin_, "serve", "--workers", "1", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        asset = httpx.get(f"http://127.0.0.1:{port}/dashboard/static/vendor/chart.umd.min.js", timeout=5)
        assert asset.status_code == 200 and len(asset.content) > 50_000
    finally:
        proc.terminate()
        proc.wait(15)
