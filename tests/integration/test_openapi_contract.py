"""The contract in the OpenAPI document (issue 10 point 5): every /v1 operation
declares its problem answers as application/problem+json; /docs loads nothing from a
third party; unsupported methods are 405 with Allow."""

from __future__ import annotations

import re

import pytest

from tests.support.env import BrokerEnv


def test_every_operation_declares_its_problem_answers(env: BrokerEnv) -> None:
    doc = env.call("GET", "/openapi.json").json()
    assert doc["components"]["schemas"]["Problem"]["required"] == ["type", "title", "status", "code", "detail"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    operations = [(path, method, op) for path, ops in doc["paths"].items() if path.startswith("/v1/")
                  for method, op in ops.items()]
    assert len(operations) > 20
    for path, method, op in operations:
        answers = op["responses"]
        for status in ("401", "403", "404", "422", "429", "503"):
            assert status in answers, (method, path, status)
        if method in ("post", "put", "patch"):
            assert "413" in answers and "409" in answers, (method, path)
        for status, answer in answers.items():
            if int(status) >= 400:
                assert list(answer["content"]) == ["application/problem+json"], (method, path, status)
                assert answer["content"]["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert {"201", "202"} <= set(submit["responses"])
    assert "Retry-After" in submit["responses"]["409"]["headers"]
    header = next(p for p in submit["parameters"] if p["name"] == "idempotency-key")
    assert header["schema"]["anyOf"][0]["maxLength"] == 255
    # PATCH null is not offered where it would be refused
    patch = doc["components"]["schemas"]["ProjectPatch"]["properties"]
    assert "anyOf" not in patch["title"] and patch["title"]["maxLength"] == 500


def test_docs_are_served_without_a_cdn(env: BrokerEnv) -> None:
    page = env.call("GET", "/docs")
    if page.status_code == 503:
        pytest.fail("Swagger UI assets missing: `make web` installs them (npm swagger-ui-dist)")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls  # nothing from another origin
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        r = env.call("GET", asset)
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    assert env.call("GET", "/redoc").status_code == 404


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("TRACE", "/v1/jobs", {"GET", "POST"}), ("TRACE", "/v1/projects/EHPC-X", {"GET", "PATCH"}),
    ("OPTIONS", "/v1/clusters/local", {"GET", "PATCH", "DELETE"}), ("TRACE", "/healthz", {"GET"}),
])
def test_other_methods_are_405_with_allow(env: BrokerEnv, method: str, path: str, allowed: set[str]) -> None:
    r = env.call(method, path, env.qm)
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "method_not_allowed"
    assert set(r.headers["allow"].replace(" ", "").split(",")) == allowed
