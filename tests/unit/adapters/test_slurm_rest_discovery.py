"""API version discovery from recorded and fake ``/openapi/v3`` documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.slurm_rest import SlurmRestAdapter
from adapters.slurm_rest.discovery import (
    choose_version,
    discover,
    job_description_fields,
    served_versions,
)
from adapters.slurm_rest.layers import LAYERS, version_key
from broker.adapter import AdapterConfigError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "slurm_rest"


def openapi(release: str) -> dict[str, Any]:
    return json.loads((FIXTURES / release / "openapi_v3.json").read_text())


@pytest.mark.parametrize(
    ("release", "served", "chosen"),
    [
        ("22.05", ("v0.0.37", "v0.0.38"), "v0.0.38"),
        ("24.11", ("v0.0.40", "v0.0.41", "v0.0.42"), "v0.0.42"),
        ("26.05", ("v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45"), "v0.0.45"),
    ],
)
def test_recorded_documents(release: str, served: tuple[str, ...], chosen: str) -> None:
    doc = openapi(release)
    assert served_versions(doc) == served
    found = discover(doc, LAYERS)
    assert found.version == chosen and found.served == served
    assert found.job_fields is not None and "environment" in found.job_fields


@pytest.mark.parametrize(
    ("release", "allowed", "chosen"),
    [
        ("24.11", ("v0.0.42",), "v0.0.42"),
        ("24.11", ("v0.0.40", "v0.0.41"), "v0.0.41"),
        ("26.05", ("v0.0.42", "v0.0.99"), "v0.0.42"),
    ],
)
def test_api_version_setting_restricts(release: str, allowed: tuple[str, ...], chosen: str) -> None:
    assert discover(openapi(release), LAYERS, allowed).version == chosen


def test_api_version_not_served_is_config_error() -> None:
    with pytest.raises(AdapterConfigError) as info:
        discover(openapi("22.05"), LAYERS, ("v0.0.42",))
    assert info.value.code == "unsupported_api_version"
    assert "v0.0.37, v0.0.38" in str(info.value)


def test_no_supported_version_is_config_error() -> None:
    with pytest.raises(AdapterConfigError) as info:
        choose_version(["v0.0.36", "v0.0.37", "v0.0.99x"], LAYERS)
    assert "serves no API version this adapter supports" in str(info.value)
    assert not info.value.transient


@pytest.mark.parametrize(
    ("release", "version", "has_gres", "has_tres_per_node"),
    [
        ("22.05", "v0.0.38", True, False),
        ("24.11", "v0.0.40", False, True),
        ("24.11", "v0.0.42", False, True),
        ("26.05", "v0.0.45", False, True),
    ],
)
def test_job_fields(release: str, version: str, has_gres: bool, has_tres_per_node: bool) -> None:
    job_fields = job_description_fields(openapi(release), version)
    assert job_fields is not None
    assert ("gres" in job_fields) is has_gres
    assert ("tres_per_node" in job_fields) is has_tres_per_node


def test_job_fields_unreadable_schema() -> None:
    doc = {"paths": {"/slurm/v0.0.40/job/submit": {"post": {}}}}
    assert job_description_fields(doc, "v0.0.40") is None
    assert job_description_fields({}, "v0.0.40") is None


def test_version_key_orders_numerically() -> None:
    assert sorted(["v0.0.9", "v0.0.45", "v0.0.100"], key=version_key) == ["v0.0.9", "v0.0.45", "v0.0.100"]
    assert version_key("vX") == ()


# ------------------------------------------------------- a fake slurmrestd (unit tests only)


FAKE_DOC = {
    "openapi": "3.0.3",
    "info": {"version": "Slurm-99.11.0&openapi/slurmctld"},
    "paths": {
        "/slurm/v0.0.36/job/submit": {"post": {}},
        "/slurmdb/v0.0.36/jobs": {"get": {}},
        "/slurm/v0.0.99/job/submit/": {"post": {}},
        "/slurmdb/v0.0.99/jobs/": {"get": {}},
        "/slurm/v0.0.45/job/submit": {"post": {}},  # no accounting path: not a usable version
    },
}


def _fake(doc: dict[str, Any], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/openapi/v3":
            return httpx.Response(200, json=doc)
        return httpx.Response(404, json={"errors": []})

    return httpx.MockTransport(handler)


def test_adapter_reports_unsupported_versions_clearly(tmp_path: Path) -> None:
    key = tmp_path / "jwt.key"
    key.write_bytes(b"k" * 32)
    seen: list[httpx.Request] = []
    settings = {"url": "http://slurm.test:6820", "auth": "jwt_key", "jwt_key_file": str(key), "query_username": "slurm"}
    adapter = SlurmRestAdapter("fake", settings, data_dir=str(tmp_path), transport=_fake(FAKE_DOC, seen))
    try:
        with pytest.raises(AdapterConfigError) as info:
            adapter.discover()
        message = str(info.value)
        assert "serves no API version this adapter supports" in message
        assert "served: v0.0.36, v0.0.99" in message
        assert info.value.code == "unsupported_api_version"
        assert seen[0].headers["X-SLURM-USER-NAME"] == "slurm"
        assert seen[0].headers["X-SLURM-USER-TOKEN"], "openapi/v3 needs a token"
        health = adapter.health()
        assert not health.ok and "unsupported_api_version" in health.detail
    finally:
        adapter.close()
