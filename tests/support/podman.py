"""The container image under test: podman (runc, cgroupfs), a clean checkout, `make image`.

Podman runs here with runc and the cgroupfs manager, host networking and low
explicit ulimits (see the project's container notes). The image is built once per
test process from a copy of the checkout holding only what git tracks (and new,
not-ignored files) — what a fresh clone has — with the documented command
``make image BASE_IMAGE=local``."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
BUILD_TIMEOUT = 900


def require_podman() -> None:
    """Skip (fail in CI) unless podman and runc can run containers as root here."""
    reason = None
    if os.geteuid() != 0:
        reason = "the image tests run rootful podman (not root)"
    elif not shutil.which("podman") or not shutil.which("runc"):
        reason = "podman/runc missing (scripts/setup-test-deps.sh installs them)"
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _containers_conf() -> Path:
    """Low default ulimits for every container, `kube play` included (which has no
    --ulimit option): raising limits is not permitted here."""
    path = Path(tempfile.gettempdir()) / "aifa-test-containers.conf"
    if not path.exists():
        path.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n')
    return path


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(_containers_conf())}
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}... failed ({done.returncode}): "
                             f"{done.stderr.strip()[-2000:]}")
    return done


def clean_checkout(dest: Path) -> Path:
    """Copy the files a fresh clone would have (tracked + new not-ignored) to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, listed.decode().split("\0")):
        src = ROOT / rel
        if not src.is_file():  # deleted in the work tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    return dest


def build_image(workdir: Path) -> tuple[str, float]:
    """``make image BASE_IMAGE=local`` in a clean checkout; the image tag and build seconds."""
    tag = f"localhost/aifa-broker:test-{uuid.uuid4().hex[:8]}"
    checkout = clean_checkout(workdir / "checkout")
    start = time.monotonic()
    done = subprocess.run(["make", "image", "BASE_IMAGE=local", f"IMAGE={tag}"], cwd=checkout,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    took = time.monotonic() - start
    if done.returncode != 0:
        raise AssertionError(f"make image failed after {took:.0f} s:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return tag, took


def remove_image(tag: str) -> None:
    """Remove the test image and the final stage's leftover layers (labelled with the
    image title); the build stage's layers — the dependency layer above all — stay
    cached for the next build, unless older than three days."""
    podman("rmi", "-f", tag, check=False)
    podman("image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=aifa-broker", check=False)
    # build-stage layers of older dependency sets (pyproject.toml changed since)
    podman("image", "prune", "-f", "--filter", "until=72h", check=False)
