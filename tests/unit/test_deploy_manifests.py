"""deploy/k8s (kustomize base + example overlay) and deploy/compose: rendered with
kubectl's built-in kustomize, validated against the Kubernetes JSON schemas shipped
by ``kubernetes-validate`` (offline), and checked for what a site relies on.
They are also run for real under ``podman kube play`` in tests/e2e/test_container_image.py."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose"
K8S_VERSIONS = ("1.29", "1.33")  # oldest supported upstream release we target, and a current one
UID = 10001


def _render(path: Path) -> list[dict[str, Any]]:
    if not shutil.which("kubectl"):
        reason = "kubectl missing (scripts/setup-test-deps.sh installs Debian's kubernetes-client)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=["base", "overlays/example"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(K8S / request.param)


def _one(docs: list[dict[str, Any]], kind: str, prefix: str = "aifa-broker") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    assert found, f"no {kind} {prefix}*"
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(rendered: list[dict[str, Any]], version: str) -> None:
    kinds = {d["kind"] for d in rendered}
    assert {"Deployment", "Service", "ConfigMap", "Job", "PodDisruptionBudget", "NetworkPolicy",
            "ServiceAccount"} <= kinds
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_is_real() -> None:
    docs = _render(K8S / "base")
    bad = copy.deepcopy(_one(docs, "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = copy.deepcopy(_one(docs, "Deployment"))
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_deployment_probes_resources_and_non_root(rendered: list[dict[str, Any]]) -> None:
    deployment = _one(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == UID
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # what the pods select and what the Service, PDB and NetworkPolicy select agree
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        doc = _one(rendered, kind)
        selector = doc["spec"]["selector"] if kind == "Service" else (
            doc["spec"]["selector"]["matchLabels"] if kind == "PodDisruptionBudget"
            else doc["spec"]["podSelector"]["matchLabels"])
        assert selector.items() <= labels.items(), kind
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_migrations_run_in_one_job_and_replicas_wait(rendered: list[dict[str, Any]]) -> None:
    job = _one(rendered, "Job")
    assert job["spec"]["completions"] == 1 and job["spec"]["parallelism"] == 1
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["db", "upgrade"]
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    config = tomllib.loads(_one(rendered, "ConfigMap")["data"]["broker.toml"])
    assert config["migrate_on_start"] is False
    deployment = _one(rendered, "Deployment")
    assert container["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]


def test_overlay_settings_are_valid_broker_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The example overlay's ConfigMap + Secret give settings the broker accepts."""
    docs = _render(K8S / "overlays" / "example")
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3 and deployment["metadata"]["namespace"] == "aifa"
    config = tmp_path / "broker.toml"
    config.write_text(_one(docs, "ConfigMap")["data"]["broker.toml"])
    secrets = {k: v for d in docs if d["kind"] == "Secret" for k, v in d.get("data", {}).items()}
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    import base64

    for var in env:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"])
            assert ref["key"] in secret["data"] or ref.get("optional"), ref
            if ref["key"] in secrets:
                monkeypatch.setenv(var["name"], base64.b64decode(secrets[ref["key"]]).decode())
        elif var["name"] == "AIFA_BROKER_CONFIG":
            monkeypatch.setenv(var["name"], str(config))
    settings = Settings()
    assert settings.mode == "production" and settings.migrate_on_start is False
    assert settings.rate_limit_storage_url and settings.rate_limit_storage_url.startswith("redis://")
    assert settings.database_url and settings.database_url.startswith("postgresql")


def test_compose_file_for_one_host(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    services = compose["services"]
    broker, migrate = services["broker"], services["migrate"]
    assert broker["image"] == migrate["image"]
    assert migrate["command"] == ["db", "upgrade"]
    assert broker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert broker["user"] == f"{UID}:{UID}" and broker["read_only"] is True and broker["cap_drop"] == ["ALL"]
    assert broker["environment"]["AIFA_BROKER_MIGRATE_ON_START"] == "false"
    # the example environment file gives settings the broker accepts
    for line in (COMPOSE / "broker.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            monkeypatch.setenv(key, value)
    for key, value in broker["environment"].items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.mode == "production" and settings.oidc_issuers and settings.rate_limit_storage_url
