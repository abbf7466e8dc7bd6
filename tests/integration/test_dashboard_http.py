"""The dashboard over HTTP without a browser: embedded-mode token login with CSRF,
session cookie flags, who sees what, server-side filtering/sorting (works without
JavaScript), CSV export, logout."""

from __future__ import annotations

import base64
import csv
import io
import json
import re

from fastapi.testclient import TestClient

from tests.support.env import BrokerEnv

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def _client(env: BrokerEnv) -> TestClient:
    return TestClient(env.app)  # its own cookie jar (one browser)


def _login(env: BrokerEnv, client: TestClient, sub: str, *roles: str, next_: str = "/dashboard") -> object:
    page = client.get("/dashboard/login", params={"next": next_})
    csrf = CSRF_RE.search(page.text).group(1)
    return client.post("/dashboard/login", data={"token": env.token(sub, *roles), "csrf": csrf, "next": next_},
                       follow_redirects=False)


def _projects_in_order(html: str) -> list[str]:
    return re.findall(r'<tr data-project="([^"]+)"', html)


def _seed(env: BrokerEnv) -> None:
    env.setup_project("EHPC-DASH-A", amount=0.05, members=("alice",), pi="pat")
    env.setup_project("EHPC-DASH-B", amount=0.1, members=("alice",), account="proj-b")
    env.setup_project("EHPC-DASH-C", amount=20.0, members=(), pi="pat", account="proj-c")
    assert env.call("PATCH", "/v1/projects/EHPC-DASH-C", env.qm, json={"status": "suspended"}).status_code == 200
    alice = env.auth("alice")
    for code, cpus in (("EHPC-DASH-B", 4), ("EHPC-DASH-A", 1)):
        job = env.call("POST", "/v1/jobs", alice, json={
            "project": code, "script": "#!/bin/sh\nsleep 1\n", "time_limit_minutes": 1,
            "cpus_per_task": cpus}).json()
        env.wait_settled(job["id"], alice)


def test_login_requires_csrf_and_sets_a_safe_cookie(env: BrokerEnv) -> None:
    c = _client(env)
    r = c.get("/dashboard/projects/X?from=2026-01-01", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fprojects%2FX%3Ffrom%3D2026-01-01"
    token = env.token("qm", "quota_manager")
    c.get("/dashboard/login")
    assert c.post("/dashboard/login", data={"token": token}, follow_redirects=False).status_code == 403
    assert c.post("/dashboard/login", data={"token": token, "csrf": "forged"},
                  follow_redirects=False).status_code == 403
    other = _client(env)  # a CSRF token from another session is worthless
    stolen = CSRF_RE.search(other.get("/dashboard/login").text).group(1)
    assert c.post("/dashboard/login", data={"token": token, "csrf": stolen},
                  follow_redirects=False).status_code == 403
    csrf = CSRF_RE.search(c.get("/dashboard/login").text).group(1)
    assert c.post("/dashboard/login", data={"token": "not.a.token", "csrf": csrf},
                  follow_redirects=False).status_code == 401

    r = _login(env, c, "qm", "quota_manager", next_="https://evil.example/steal")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("aifa_dashboard_session=")
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower() and "path=/dashboard" in cookie
    payload = cookie.split("=", 1)[1].split(".")[0]
    data = json.loads(base64.b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(data["sid"], str) and "roles" not in data  # the session itself lives server-side
    assert token not in cookie and "token" not in data  # the token is never kept

    page = c.get("/dashboard")
    assert page.status_code == 200 and 'lang="en"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"

    # logout is a CSRF-protected POST
    assert c.post("/dashboard/logout", data={"csrf": "forged"}, follow_redirects=False).status_code == 403
    csrf = CSRF_RE.search(page.text).group(1)
    r = c.post("/dashboard/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    assert c.get("/dashboard", follow_redirects=False).status_code == 303


def test_portfolio_filters_sorts_and_exports_without_javascript(env: BrokerEnv) -> None:
    _seed(env)
    c = _client(env)
    _login(env, c, "qm", "quota_manager")
    html = c.get("/dashboard").text
    assert _projects_in_order(html) == ["EHPC-DASH-A", "EHPC-DASH-B", "EHPC-DASH-C"]
    assert '<th scope="col"' in html and "<caption>" in html and '<label for="f-status">' in html
    assert _projects_in_order(c.get("/dashboard", params={"status": "suspended"}).text) == ["EHPC-DASH-C"]
    assert _projects_in_order(c.get("/dashboard", params={"q": "dash-b"}).text) == ["EHPC-DASH-B"]
    usage = {r["project"]: r for r in env.call("GET", "/v1/usage", env.qm).json()["allocations"]}
    assert usage["EHPC-DASH-B"]["percent_used"] > usage["EHPC-DASH-A"]["percent_used"] > 0
    by_pct = c.get("/dashboard", params={"sort": "percent_used", "order": "desc"}).text
    assert _projects_in_order(by_pct) == ["EHPC-DASH-B", "EHPC-DASH-A", "EHPC-DASH-C"]
    assert 'aria-sort="descending"' in by_pct
    threshold = usage["EHPC-DASH-A"]["percent_used"] + 1e-6
    assert _projects_in_order(c.get("/dashboard", params={"min_used": threshold}).text) == ["EHPC-DASH-B"]

    exported = c.get("/dashboard/portfolio.csv", params={"sort": "percent_used", "order": "desc"})
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["project"] for r in rows] == ["EHPC-DASH-B", "EHPC-DASH-A", "EHPC-DASH-C"]
    assert float(rows[0]["used"]) == usage["EHPC-DASH-B"]["used"]

    project = c.get("/dashboard/projects/EHPC-DASH-B")
    assert project.status_code == 200
    assert 'id="burndown-data-' in project.text and "usage-by-user" in project.text
    csv_text = c.get("/dashboard/projects/EHPC-DASH-B/usage.csv", params={"group_by": "user"}).text
    api_csv = env.call("GET", "/v1/projects/EHPC-DASH-B/usage", env.qm,
                       params={"group_by": "user", "format": "csv"}).text
    assert csv_text == api_csv
    assert c.get("/dashboard/notifications").status_code == 200


def test_pi_sees_own_projects_read_only_and_others_are_refused(env: BrokerEnv) -> None:
    _seed(env)
    pi = _client(env)
    _login(env, pi, "pat")
    html = pi.get("/dashboard").text
    assert _projects_in_order(html) == ["EHPC-DASH-A", "EHPC-DASH-C"]
    assert "Read-only" in html
    assert pi.get("/dashboard/projects/EHPC-DASH-A").status_code == 200
    assert pi.get("/dashboard/projects/EHPC-DASH-B").status_code == 404
    assert pi.get("/dashboard/projects/EHPC-DASH-B/usage.csv").status_code == 404

    member = _client(env)  # a plain member (not PI) and a stranger: 403
    _login(env, member, "alice")
    for path in ("/dashboard", "/dashboard/projects/EHPC-DASH-A", "/dashboard/portfolio.csv",
                 "/dashboard/notifications"):
        r = member.get(path)
        assert r.status_code == 403, path
    stranger = _client(env)
    _login(env, stranger, "nobody")
    assert stranger.get("/dashboard").status_code == 403
