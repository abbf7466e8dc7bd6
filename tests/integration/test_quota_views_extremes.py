"""Quota views never answer 500, whatever the grant, burn rate or dates: the demo's
1,000 core-hour grant with one 1-second job (the issue's reproduction), extreme
grants with a micro-unit of usage, far dates, and an overdrawn allocation flagged
as overdrawn. SQLite and PostgreSQL."""

from __future__ import annotations

import re
from datetime import date

import sqlalchemy as sa
from fastapi.testclient import TestClient

from broker.db import session_scope
from broker.models import Allocation
from broker.services import ledger
from tests.support.env import BrokerEnv

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
VIEWS = ["/v1/usage", "/v1/usage/allocations", "/v1/usage/allocations?format=csv",
         "/v1/usage/allocations?sort=projected_exhaustion", "/v1/usage/report?group_by=day"]


def _dashboard(env: BrokerEnv) -> TestClient:
    c = TestClient(env.app)
    csrf = CSRF_RE.search(c.get("/dashboard/login").text).group(1)  # type: ignore[union-attr]
    r = c.post("/dashboard/login", data={"token": env.token("qm", "quota_manager"), "csrf": csrf},
               follow_redirects=False)
    assert r.status_code == 303, r.text
    return c


def _all_views_answer(env: BrokerEnv, codes: list[str]) -> dict[str, dict]:
    for path in VIEWS:
        r = env.call("GET", path, env.qm)
        assert r.status_code == 200, (path, r.text)
    for code in codes:
        r = env.call("GET", f"/v1/projects/{code}/burndown", env.qm)
        assert r.status_code == 200, (code, r.text)
    c = _dashboard(env)
    assert c.get("/dashboard").status_code == 200
    for code in codes:
        assert c.get(f"/dashboard/projects/{code}").status_code == 200
    return {r["project"]: r for r in env.call("GET", "/v1/usage", env.qm).json()["allocations"]}


def test_demo_grant_with_a_one_second_job(env: BrokerEnv) -> None:
    env.setup_project("EHPC-DEMO-1", amount=1000, unit="core_hours")
    alice = env.auth("alice")
    job = env.call("POST", "/v1/jobs", alice, json={
        "project": "EHPC-DEMO-1", "script": "#!/bin/sh\nsleep 1\n", "time_limit_minutes": 1}).json()
    assert env.wait_settled(job["id"], alice)["charged"]["amount"] > 0
    row = _all_views_answer(env, ["EHPC-DEMO-1"])["EHPC-DEMO-1"]
    assert row["projected_exhaustion"] is None and row["forecast"] == "beyond_horizon"
    assert row["overdrawn"] is False
    assert "not within 10 years" in _dashboard(env).get("/dashboard").text


def test_extreme_grants_dates_and_overdrawn(env: BrokerEnv) -> None:
    env.setup_project("EHPC-HUGE", amount=1e12, unit="core_hours")
    env.setup_project("EHPC-OVER", amount=1, unit="core_hours", account="proj-b")
    env.setup_project("EHPC-ENDS", amount=5, unit="core_hours", account="proj-c")
    with env.engine.begin() as conn:
        conn.execute(sa.text("UPDATE allocations SET start_date = :s, end_date = :e WHERE account = 'proj-a'"),
                     {"s": date(1, 1, 1), "e": date(9999, 12, 31)})
        conn.execute(sa.text("UPDATE allocations SET end_date = :e WHERE account = 'proj-c'"),
                     {"e": date(2000, 1, 1)})
    with session_scope(env.engine) as s:
        for alloc in s.exec(sa.select(Allocation)).scalars():  # type: ignore[call-overload]
            # one micro-unit on the huge grant; twice the grant on the small one (an import)
            amount = {"proj-a": 1, "proj-b": 2_000_000, "proj-c": 1_000_000}[alloc.account]
            ledger.apply(s, allocation=alloc, kind="import", amount=amount, actor="test")
    rows = _all_views_answer(env, ["EHPC-HUGE", "EHPC-OVER", "EHPC-ENDS"])
    assert rows["EHPC-HUGE"]["forecast"] == "not_before_end" and rows["EHPC-HUGE"]["projected_exhaustion"] is None
    assert rows["EHPC-OVER"]["overdrawn"] is True and rows["EHPC-OVER"]["forecast"] == "exhausted"
    assert rows["EHPC-ENDS"]["forecast"] == "not_before_end"  # ended long ago
    page = _dashboard(env).get("/dashboard").text
    over = page[page.index('data-project="EHPC-OVER"'):]
    assert "overdrawn" in over[:over.index("</tr>")] and "≥ 95 %" not in over[:over.index("</tr>")]
