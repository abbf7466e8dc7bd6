"""The dashboard in real headless Chromium (Debian's, driven by Playwright), logging
in through a real OpenID provider (oidc-provider on loopback) with the
authorization-code flow + PKCE. Screenshots land in test-artifacts/."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.db import session_scope
from broker.models import Allocation
from broker.services import ledger
from broker.services.common import today
from tests.e2e.dashboard_support import (
    CHROMIUM_ARGS,
    identity_provider,
    loopback_only,
    require_browser,
    screenshot,
    serve,
    skip_reason,
)
from tests.integration.test_usage_history import _record
from tests.support.env import BrokerEnv, broker_env
from tests.support.server import free_port

pytestmark = [pytest.mark.browser, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

ACCOUNTS = {"qm-ada": {"roles": ["quota_manager"]}, "alice": {"roles": []}, "pat": {"roles": []}}


@dataclass
class Stack:
    env: BrokerEnv
    url: str
    browser: Any
    login_seconds: list[float]


def _seed(env: BrokerEnv) -> None:
    start = today() - timedelta(days=45)
    end = today() + timedelta(days=45)
    env.setup_project("EHPC-BRW-001", amount=100.0, members=("alice",), pi="pat")
    env.setup_project("EHPC-BRW-002", amount=50.0, members=("alice",), account="proj-b")
    env.setup_project("EHPC-BRW-003", amount=80.0, members=(), account="proj-c")
    for alloc_id in (1, 2, 3):
        code = f"EHPC-BRW-00{alloc_id}"
        r = env.call("PATCH", f"/v1/projects/{code}/allocations/{alloc_id}", env.qm,
                     json={"start_date": start.isoformat(), "end_date": end.isoformat()})
        assert r.status_code == 200, r.text
    # a usage history: daily charges over the last six weeks
    with session_scope(env.engine) as s:
        for alloc_id, per_day in ((1, 0.9), (2, 1.05)):
            alloc = s.get(Allocation, alloc_id)
            assert alloc is not None
            for days_ago in range(42, 0, -1):
                at = datetime.combine(today() - timedelta(days=days_ago), datetime.min.time(), UTC) + \
                    timedelta(hours=12)
                ledger.apply(s, allocation=alloc, kind="charge", amount=round(per_day * 1_000_000 * (
                    1 + (days_ago % 3) / 10)), actor="seed", reason="history", occurred_at=at)
    r = env.call("PATCH", "/v1/projects/EHPC-BRW-001/allocations/1", env.qm,
                 json={"amount": 120.0, "reason": "top-up for the final runs"})
    assert r.status_code == 200, r.text
    alice = env.auth("alice")
    job = env.call("POST", "/v1/jobs", alice, json={
        "project": "EHPC-BRW-001", "script": "#!/bin/sh\nsleep 1\n", "time_limit_minutes": 5}).json()
    env.wait_settled(job["id"], alice)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_browser()
    from playwright.sync_api import sync_playwright

    tmp: Path = tmp_path_factory.mktemp("dashboard-browser")
    broker_port, idp_port = free_port(), free_port()
    broker_url = f"http://127.0.0.1:{broker_port}"
    with identity_provider(idp_port, client_id="aifa-dashboard", client_secret="e2e-client-secret-123456",
                           redirect_uri=f"{broker_url}/dashboard/auth/callback", accounts=ACCOUNTS) as issuer, \
        broker_env(tmp, f"sqlite:///{tmp / 'broker.sqlite3'}", public_url=broker_url, dashboard_oidc={
            "server_metadata_url": f"{issuer}/.well-known/openid-configuration",
            "client_id": "aifa-dashboard", "client_secret": "e2e-client-secret-123456"}) as env:
        _seed(env)
        with serve(env.app, broker_port) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            try:
                yield Stack(env, url, browser, [])
            finally:
                browser.close()


def _login(stack: Stack, user: str) -> tuple[Any, Any]:
    context = stack.browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    context.route("**/*", loopback_only)
    page = context.new_page()
    t0 = time.perf_counter()
    page.goto(f"{stack.url}/dashboard")
    page.get_by_role("link", name="Sign in with your institution").click()
    page.locator('input[name="login"]').fill(user)
    page.locator('input[name="password"]').fill("any password")
    page.get_by_role("button", name="Sign-in").click()
    page.get_by_role("button", name="Continue").click()
    page.locator("#signed-in-user").wait_for()
    stack.login_seconds.append(time.perf_counter() - t0)
    assert page.locator("#signed-in-user").inner_text() == user
    return context, page


def _rows(page: Any) -> list[str]:
    return page.eval_on_selector_all("#portfolio tbody tr[data-project]", "rows => rows.map(r => r.dataset.project)")


def test_quota_manager_logs_in_sees_portfolio_chart_and_exports_csv(stack: Stack) -> None:
    env = stack.env
    context, page = _login(stack, "qm-ada")
    try:
        assert page.url == f"{stack.url}/dashboard"
        assert _rows(page) == ["EHPC-BRW-001", "EHPC-BRW-002", "EHPC-BRW-003"]
        screenshot(page, "dashboard-portfolio")

        # sort by % used (a server-side link), then filter
        page.get_by_role("link", name="% used").click()
        page.get_by_role("link", name="% used ▲").wait_for()
        page.get_by_role("link", name="% used ▲").click()
        page.get_by_role("link", name="% used ▼").wait_for()
        usage = {r["project"]: r for r in env.call("GET", "/v1/usage", env.qm).json()["allocations"]}
        by_pct = sorted(usage, key=lambda c: usage[c]["percent_used"], reverse=True)
        assert _rows(page) == by_pct
        page.get_by_label("Min % used").fill("60")
        page.get_by_role("button", name="Apply").click()
        page.wait_for_url("**min_used=60**")
        assert _rows(page) == [c for c in by_pct if usage[c]["percent_used"] >= 60]
        screenshot(page, "dashboard-portfolio-filtered")

        # open a project: the chart renders with the API's numbers
        page.goto(f"{stack.url}/dashboard")
        page.get_by_role("link", name="EHPC-BRW-001").click()
        page.get_by_role("heading", name="EHPC-BRW-001").wait_for()
        page.locator('canvas#burndown-1[data-rendered="true"]').wait_for()
        drawn = page.evaluate("""() => { const c = window.aifaCharts['1'];
            return {labels: c.data.labels, sets: c.data.datasets.map(d => d.data),
                    points: c.getDatasetMeta(1).data.length, ymax: c.scales.y.max}; }""")
        api = env.call("GET", "/v1/projects/EHPC-BRW-001/burndown", env.qm).json()["allocations"][0]
        assert drawn["labels"] == api["labels"]
        assert drawn["sets"] == [api["granted"], api["used"], api["projected"]]
        assert drawn["points"] == len(api["labels"]) and drawn["ymax"] >= 120.0
        project = env.call("GET", "/v1/projects/EHPC-BRW-001", env.qm).json()["allocations"][0]
        used_today = api["used"][api["labels"].index(api["today"])]
        assert abs(used_today - project["charged"]) < 1e-6
        assert api["granted"][-1] == 120.0 == project["granted"]
        row = page.locator('#allocations tr[data-allocation="1"] td')
        assert row.nth(3).inner_text() == f"{project['charged']:,.2f}"
        assert "top-up for the final runs" in page.locator("#adjustments").inner_text()
        screenshot(page, "dashboard-project")

        # export CSV: the file is what the API returns
        with page.expect_download() as info:
            page.locator("#export-user").click()
        text = Path(info.value.path()).read_bytes().decode()
        api_csv = env.call("GET", "/v1/projects/EHPC-BRW-001/usage", env.qm,
                           params={"group_by": "user", "format": "csv"}).text
        assert text == api_csv and "alice" in text

        # sign out
        page.get_by_role("button", name="Sign out").click()
        page.get_by_role("heading", name="Sign in").wait_for()
        assert page.goto(f"{stack.url}/dashboard").url.startswith(f"{stack.url}/dashboard/login")
    finally:
        context.close()


def test_user_without_the_quota_manager_role_is_refused(stack: Stack) -> None:
    context, page = _login(stack, "alice")
    try:
        assert page.locator("#refused").is_visible()
        response = page.goto(f"{stack.url}/dashboard")
        assert response is not None and response.status == 403
        assert page.goto(f"{stack.url}/dashboard/projects/EHPC-BRW-001").status == 403
        screenshot(page, "dashboard-refused")
    finally:
        context.close()


def test_pi_gets_a_read_only_view_of_own_projects(stack: Stack) -> None:
    context, page = _login(stack, "pat")
    try:
        assert _rows(page) == ["EHPC-BRW-001"]
        assert page.get_by_text("Read-only view").is_visible()
        assert page.goto(f"{stack.url}/dashboard/projects/EHPC-BRW-002").status == 404
        screenshot(page, "dashboard-pi")
    finally:
        context.close()
    _record("dashboard_login_seconds", [round(s, 3) for s in stack.login_seconds])
