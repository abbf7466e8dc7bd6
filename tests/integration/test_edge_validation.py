"""Validation at the edge, complete (issue 10 point 2): every input the attack run
turned into a 500 is a 4xx problem+json with a stable code, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.support.env import BrokerEnv
from tests.support.server import live_server

GOOD = {"project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 5}


def _problem(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status and body["detail"]
    return body


@pytest.mark.parametrize("path", [
    "/v1/jobs/%00", "/v1/jobs/a%00b/output", "/v1/projects/%00", "/v1/clusters/%00/health",
    "/v1/jobs?project=%00", "/v1/jobs?user=a%00", "/v1/projects/EHPC-TEST-001/usage?group_by=%00",
    "/v1/jobs/%ff%fe",
])
def test_nul_and_control_characters_in_urls_are_422(env: BrokerEnv, path: str) -> None:
    _problem(env.call("GET", path, env.qm), 422, "validation_error")


@pytest.mark.parametrize("params", [
    {"from": "0001-01-01"}, {"to": "9999-12-31"}, {"from": "1900-01-01", "to": "9999-12-31"},
])
def test_far_range_usage_dates_are_422(env: BrokerEnv, params: dict[str, str]) -> None:
    env.setup_project()
    for path in ("/v1/projects/EHPC-TEST-001/usage", "/v1/usage/report"):
        _problem(env.call("GET", path, env.qm, params=params), 422, "validation_error")


def test_huge_integer_id_in_a_path_is_422(env: BrokerEnv) -> None:
    env.setup_project()
    r = env.call("PATCH", f"/v1/projects/EHPC-TEST-001/allocations/{10**30}", env.qm, json={"reason": "x"})
    _problem(r, 422, "validation_error")
    r = env.call("PATCH", f"/v1/projects/EHPC-TEST-001/allocations/{2**31 - 1}", env.qm, json={"reason": "x"})
    _problem(r, 404, "not_found")


@pytest.mark.parametrize(("path", "field"), [
    ("/v1/projects/EHPC-TEST-001", "title"), ("/v1/projects/EHPC-TEST-001", "status"),
    ("/v1/projects/EHPC-TEST-001", "access_mode"), ("/v1/projects/EHPC-TEST-001", "attributes"),
    ("/v1/clusters/local", "cost_model"), ("/v1/clusters/local", "state"),
    ("/v1/clusters/local", "description"), ("/v1/clusters/local", "connection"),
    ("ALLOC", "thresholds"), ("ALLOC", "amount"), ("ALLOC", "account"),
])
def test_patch_null_is_422_where_it_means_nothing(env: BrokerEnv, path: str, field: str) -> None:
    alloc = env.setup_project()
    if path == "ALLOC":
        path = f"/v1/projects/EHPC-TEST-001/allocations/{alloc['id']}"
    _problem(env.call("PATCH", path, env.qm, json={field: None}), 422, "validation_error")
    assert env.call("GET", "/v1/projects/EHPC-TEST-001", env.qm).status_code == 200


def test_patch_null_clears_where_it_means_clear(env: BrokerEnv) -> None:
    env.setup_project()
    r = env.call("PATCH", "/v1/projects/EHPC-TEST-001", env.qm, json={"end_date": "2030-01-01"})
    assert r.status_code == 200 and r.json()["end_date"] == "2030-01-01"
    r = env.call("PATCH", "/v1/projects/EHPC-TEST-001", env.qm, json={"end_date": None})
    assert r.status_code == 200 and r.json()["end_date"] is None


@pytest.mark.parametrize("attributes", [
    {"x": float("nan")}, {"x": float("inf")}, {"x": [1.0, float("-inf")]}, {"x": "a\x00b"}, {"a\x00": 1},
    {"deep": [[[[[[[[[[1]]]]]]]]]]}, {f"k{i}": i for i in range(300)}, {"x": "y" * 10_000},
])
def test_project_attributes_are_finite_bounded_and_nul_free(env: BrokerEnv, attributes: dict[str, Any]) -> None:
    env.setup_project()
    import json

    raw = json.dumps({"attributes": attributes})  # NaN/Infinity as JS literals, as a client may send
    r = env.call("PATCH", "/v1/projects/EHPC-TEST-001", env.qm, content=raw,
                 headers={"Content-Type": "application/json"})
    _problem(r, 422, "validation_error")
    r = env.call("POST", "/v1/projects", env.qm, content=json.dumps(
        {"code": "EHPC-NEW-1", "title": "t", "attributes": attributes}), headers={"Content-Type": "application/json"})
    _problem(r, 422, "validation_error")


@pytest.mark.parametrize("body", [{"title": "a\x00b"}, {"title": "t", "code": "X", "start_date": "0001-01-01"}])
def test_nul_in_body_strings_and_far_dates_are_422(env: BrokerEnv, body: dict[str, Any]) -> None:
    _problem(env.call("POST", "/v1/projects", env.qm, json={"code": "EHPC-NUL-1", "title": "t", **body}),
             422, "validation_error")


@pytest.mark.parametrize("weight", ["1e999", "Infinity", "NaN", "-1", "1e7", "true"])
def test_cost_weights_must_be_finite_and_bounded(env: BrokerEnv, weight: str) -> None:
    raw = '{"cost_model": {"partitions": {"*": {"core_hours": {"cpu": WEIGHT}}}}}'.replace("WEIGHT", weight)
    r = env.call("PATCH", "/v1/clusters/local", env.qm, content=raw, headers={"Content-Type": "application/json"})
    _problem(r, 422, "validation_error")
    env.setup_project()
    r = env.call("POST", "/v1/jobs/estimate", env.auth("alice"), json=GOOD)
    assert r.status_code == 200 and r.json()["allowed"], r.text


def test_estimate_beyond_int64_micro_units_is_request_too_large(env: BrokerEnv) -> None:
    env.setup_project(amount=1e12)
    r = env.call("PATCH", "/v1/clusters/local", env.qm,
                 json={"cost_model": {"partitions": {"*": {"core_hours": {"cpu": 1e6}}}}})
    assert r.status_code == 200, r.text
    # 100,000 nodes × 4096 × 4096 cpus × 1e6 per core-hour × two weeks: far beyond 2^63 micro-units
    body = {**GOOD, "nodes": 100_000, "ntasks_per_node": 4096, "cpus_per_task": 4096,
            "time_limit_minutes": 20_160}
    _problem(env.call("POST", "/v1/jobs/estimate", env.auth("alice"), json=body), 422, "request_too_large")
    _problem(env.call("POST", "/v1/jobs", env.auth("alice"), json=body), 422, "request_too_large")
    with env.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar() == 0


def test_stored_infinite_weight_does_not_break_estimates(env: BrokerEnv) -> None:
    """A weight stored before weights were bounded (SQLite took 1e999) → 422, not 500."""
    env.setup_project()
    with env.engine.begin() as conn:
        conn.execute(sa.text("UPDATE clusters SET cost_model = :m WHERE name = 'local'"),
                     {"m": '{"partitions": {"*": {"core_hours": {"cpu": 1e308}}}}'})
    _problem(env.call("POST", "/v1/jobs/estimate", env.auth("alice"), json=GOOD), 422, "request_too_large")


@pytest.fixture
def base(env: BrokerEnv) -> Iterator[str]:
    with live_server(env.app) as url:
        yield url


def test_chunked_ten_megabyte_body_is_413(env: BrokerEnv, base: str) -> None:
    env.setup_project()

    def chunks() -> Iterator[bytes]:
        yield b'{"project": "EHPC-TEST-001", "time_limit_minutes": 5, "script": "'
        for _ in range(160):
            yield b"x" * 65536
        yield b'"}'

    with httpx.Client(base_url=base, timeout=60) as client:
        r = client.post("/v1/jobs", content=chunks(), headers={**env.auth("alice"), "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers  # really chunked
    _problem(r, 413, "payload_too_large")


@pytest.mark.parametrize("raw", [b"[" * 1000 + b"]" * 1000, b'{"project": "\xff\xfe"}', b'{"a": ' * 1000 + b"1" + b"}" * 1000])
def test_deep_json_and_invalid_utf8_are_422(env: BrokerEnv, raw: bytes) -> None:
    env.setup_project()
    r = env.call("POST", "/v1/jobs", env.auth("alice"), content=raw, headers={"Content-Type": "application/json"})
    _problem(r, 422, "validation_error")


@pytest.mark.parametrize("method", ["TRACE", "PUT", "CONNECT"])
def test_unsupported_methods_are_405_with_allow(env: BrokerEnv, method: str) -> None:
    r = env.call(method, "/v1/jobs", env.qm)
    body = _problem(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}, body


def test_over_long_user_in_account_path_is_422(env: BrokerEnv) -> None:
    r = env.call("PUT", "/v1/clusters/local/accounts/" + "u" * 300, env.qm, json={"username": "alice"})
    _problem(r, 422, "validation_error")


@pytest.mark.parametrize("raw", ["2026-01-01T00:00:00|a\x00b", "2026-01-01T00:00:00|" + "f" * 100, "9999-12-31|x",
                                 "8999-12-31T00:00:00+00:00|x", "0001-01-01T00:00:00+05:00|x"])
def test_forged_cursor_is_422_or_empty_never_500(env: BrokerEnv, raw: str) -> None:
    import base64

    cursor = base64.urlsafe_b64encode(raw.encode()).decode()
    r = env.call("GET", "/v1/jobs", env.qm, params={"cursor": cursor})
    if raw.endswith("+00:00|x"):
        assert r.status_code == 200 and r.json()["items"] == []
    else:
        _problem(r, 422, "validation_error")


def test_dashboard_far_range_dates_are_422_pages(env: BrokerEnv) -> None:
    import re

    from fastapi.testclient import TestClient

    env.setup_project()
    browser = TestClient(env.app)
    csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get("/dashboard/login").text).group(1)  # type: ignore[union-attr]
    browser.post("/dashboard/login", data={"token": env.token("qm", "quota_manager"), "csrf": csrf})
    for query in ("from=0001-01-01&to=9999-12-31", "from=9999-12-31"):
        assert browser.get(f"/dashboard/projects/EHPC-TEST-001?{query}").status_code == 422
