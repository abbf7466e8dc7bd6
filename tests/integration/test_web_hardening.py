"""Web hardening (issue 10 point 6): server-side session revocation on logout and on
role changes, formula-safe CSV exports, production refuses a non-https public_url."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.config import OIDCIssuer, Settings
from tests.support.env import BrokerEnv

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def _login(env: BrokerEnv, sub: str, *roles: str) -> TestClient:
    client = TestClient(env.app)
    csrf = CSRF_RE.search(client.get("/dashboard/login").text).group(1)  # type: ignore[union-attr]
    r = client.post("/dashboard/login", data={"token": env.token(sub, *roles), "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    return client


def _copy(client: TestClient, env: BrokerEnv) -> TestClient:
    """Another browser holding a copy of the cookie (stolen, or a second tab's jar)."""
    thief = TestClient(env.app)
    for cookie in client.cookies.jar:
        thief.cookies.set(cookie.name, cookie.value or "", domain=cookie.domain, path=cookie.path)
    return thief


def test_logout_revokes_the_session_server_side(env: BrokerEnv) -> None:
    browser = _login(env, "qm", "quota_manager")
    thief = _copy(browser, env)
    assert thief.get("/dashboard", follow_redirects=False).status_code == 200
    page = browser.get("/dashboard")
    csrf = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]
    assert browser.post("/dashboard/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    # the copied cookie is still validly signed, but its session is gone on the server
    r = thief.get("/dashboard", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")


def test_a_role_change_revokes_the_users_sessions(env: BrokerEnv) -> None:
    old = _login(env, "qm", "quota_manager")
    assert old.get("/dashboard", follow_redirects=False).status_code == 200
    # the IdP withdrew the role: the next login carries other roles → older sessions end
    _login(env, "qm")
    assert old.get("/dashboard", follow_redirects=False).status_code == 303
    # ... and so does the API seeing the user with other global roles than a session holds
    again = _login(env, "qm", "quota_manager")
    assert again.get("/dashboard", follow_redirects=False).status_code == 200
    assert env.call("GET", "/v1/projects", env.auth("qm")).status_code == 200  # no quota_manager any more
    assert again.get("/dashboard", follow_redirects=False).status_code == 303
    # a project role change (PI → member) ends the user's sessions too
    env.setup_project("EHPC-ROLE-1", members=(), pi="pat")
    pat = _login(env, "pat")
    assert pat.get("/dashboard", follow_redirects=False).status_code == 200
    r = env.call("POST", "/v1/projects/EHPC-ROLE-1/members", env.qm, json={"user": "pat", "role": "member"})
    assert r.status_code == 201
    assert pat.get("/dashboard", follow_redirects=False).status_code == 303


FORMULAS = ["=HYPERLINK(\"https://evil.example\",\"x\")", "+1+1", "-2+3", "@SUM(A1)"]


@pytest.mark.parametrize("title", FORMULAS)
def test_csv_formula_escaped(env: BrokerEnv, title: str) -> None:
    env.setup_project("EHPC-CSV-1")
    assert env.call("PATCH", "/v1/projects/EHPC-CSV-1", env.qm, json={"title": title}).status_code == 200
    r = env.call("GET", "/v1/usage/allocations", env.qm, params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    row = next(x for x in rows if x["project"] == "EHPC-CSV-1")
    assert row["title"] == "'" + title  # shown as text, not evaluated
    assert float(row["granted"]) == 100.0  # numbers stay numbers
    qm = _login(env, "qm", "quota_manager")
    export = qm.get("/dashboard/portfolio.csv")
    assert export.status_code == 200 and ("'" + title) in export.text.replace('""', '"')
    assert not any(line.startswith(("=", "+", "@")) or ",=" in line for line in export.text.splitlines())


def test_production_requires_https_public_url(tmp_path: Path) -> None:
    base = dict(mode="production", data_dir=tmp_path, database_url="postgresql+psycopg://x@127.0.0.1/x",
                oidc_issuers=[OIDCIssuer(issuer="https://idp.example", audience="aifa")])
    for url in (None, "http://broker.example"):
        with pytest.raises(ValueError, match="https public_url"):
            Settings(**base, public_url=url)  # type: ignore[arg-type]
    assert Settings(**base, public_url="https://broker.example").public_url  # type: ignore[arg-type]
    assert Settings(**base, public_url="http://broker.example",  # type: ignore[arg-type]
                    allow_insecure_public_url=True).allow_insecure_public_url
