"""Browser-test plumbing: a real OpenID provider (node, tests/e2e/idp), the broker
under uvicorn on a chosen loopback port, headless Debian Chromium via Playwright.

Everything missing (chromium, node, the IdP's node_modules, playwright) makes the
tests skip with the reason and the fix: ``scripts/setup-test-deps.sh``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from tests.support.server import live_server
from tests.support.tools import ROOT, SETUP_HINT, chromium, node

IDP_DIR = ROOT / "tests" / "e2e" / "idp"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if chromium() is None:
        return f"Debian chromium is not installed ({SETUP_HINT})"
    if node() is None:
        return "node is not installed (the test identity provider needs it)"
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        return f"the test IdP's node modules are missing ({SETUP_HINT})"
    if importlib.util.find_spec("playwright") is None:
        return f"playwright is not installed (pip install -e '.[dev]', or {SETUP_HINT})"
    return None


@contextmanager
def identity_provider(port: int, *, client_id: str, client_secret: str, redirect_uri: str,
                      accounts: dict[str, dict[str, Any]]) -> Iterator[str]:
    """Start oidc-provider on 127.0.0.1:``port``; yield its issuer URL."""
    env = {**os.environ, "IDP_PORT": str(port), "IDP_CLIENT_ID": client_id, "IDP_CLIENT_SECRET": client_secret,
           "IDP_REDIRECT_URI": redirect_uri, "IDP_ACCOUNTS": json.dumps(accounts), "NODE_NO_WARNINGS": "1"}
    proc = subprocess.Popen([node() or "node", "server.mjs"], cwd=IDP_DIR, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("ready "):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(20):
            raise RuntimeError("the test IdP did not start: " + "\n".join(lines[-20:]))
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def serve(app: FastAPI, port: int) -> Iterator[str]:
    """The app under uvicorn on 127.0.0.1:``port`` (lifespan handled by the caller)."""
    with live_server(app, port) as base:
        yield base


def loopback_only(route: Any) -> None:
    """Abort every request that would leave this machine (e.g. the IdP page's web font)."""
    url: str = route.request.url
    if url.startswith(("http://127.0.0.1", "data:", "blob:")):
        route.continue_()
    else:
        route.abort()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def require_browser() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
