"""The container image: built from a clean checkout with the documented command
(``make image BASE_IMAGE=local``), run as non-root against the machine's PostgreSQL
and the Slurm 22.05 dev cluster (slurmrestd), healthy, and a job submitted through
it settles. Also: the Kubernetes manifests run under ``podman kube play``.

Slurm-marked with the release in the test id, so the image is built once, in the
22.05 test process (scripts/test.sh)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import slurm
from tests.support.env import fresh_database, ledger_kinds
from tests.support.podman import LIMITS, build_image, podman, remove_image, require_podman
from tests.support.server import free_port

RELEASE = "22.05"
pytestmark = pytest.mark.slurm
UID = 10001
KEY_IN_CONTAINER = "/etc/aifa-broker-keys/slurmrestd-jwt.key"


@pytest.fixture(scope="module", params=[RELEASE], ids=lambda r: f"slurm-{r}")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_podman()
    tag, took = build_image(tmp_path_factory.mktemp("image"))
    print(f"\nmake image BASE_IMAGE=local: {took:.0f} s")
    yield tag
    remove_image(tag)


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgresql", tmp_path) as url:
        yield url


def _owned_dir(path: Path, mode: int = 0o700) -> Path:
    """A directory the container's user (uid 10001) owns, as a volume would be."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    path.chmod(mode)
    return path


def _keys_dir(tmp_path: Path) -> Path:
    """The slurmrestd JWT key, readable only by the container's user."""
    keys = _owned_dir(tmp_path / "keys", 0o500)
    src = Path(slurm.definition(RELEASE, "slurm_rest")["connection"]["jwt_key_file"])
    dst = keys / "slurmrestd-jwt.key"
    shutil.copyfile(src, dst)
    os.chown(dst, UID, UID)
    dst.chmod(0o400)
    return keys


class Container:
    def __init__(self, name: str, base: str) -> None:
        self.name, self.base = name, base

    def health(self) -> str:
        """Run the image's HEALTHCHECK now; its verdict."""
        done = podman("healthcheck", "run", self.name, check=False, timeout=30)
        return "healthy" if done.returncode == 0 else f"unhealthy ({done.stdout.strip()} {done.stderr.strip()})"

    def logs(self) -> str:
        return podman("logs", self.name, check=False).stderr[-3000:]


def _run(image: str, name: str, env: dict[str, str], volumes: list[str], *args: str,
         detach: bool = True) -> str:
    argv = ["run", *LIMITS, "--network", "host", "--name", name, "--read-only", "--tmpfs", "/tmp",
            "--security-opt", "no-new-privileges", "--cap-drop", "ALL"]
    if detach:
        argv.append("-d")
    else:
        argv.append("--rm")
    for k, v in env.items():
        argv += ["-e", f"{k}={v}"]
    for v in volumes:
        argv += ["-v", v]
    return podman(*argv, image, *args, timeout=120).stdout.strip()


@pytest.fixture
def container(image: str, pg_url: str, tmp_path: Path) -> Iterator[tuple[Container, dict[str, str], list[str]]]:
    slurm.require_cluster(RELEASE)
    port = free_port()
    name = f"aifa-test-{uuid.uuid4().hex[:8]}"
    env = {"AIFA_BROKER_DATABASE_URL": pg_url, "AIFA_BROKER_PORT": str(port),
           "AIFA_BROKER_REGISTER_LOCAL_CLUSTER": "false", "AIFA_BROKER_TRACKER_INTERVAL_SECONDS": "0.5"}
    volumes = [f"{_owned_dir(tmp_path / 'data')}:/var/lib/aifa-broker",
               f"{_keys_dir(tmp_path)}:/etc/aifa-broker-keys:ro"]
    _run(image, name, env, volumes, "serve")
    box = Container(name, f"http://127.0.0.1:{port}")
    try:
        yield box, env, volumes
    finally:
        print(box.logs()[-1500:])
        podman("rm", "-f", "-t", "5", name, check=False)


def _wait_healthy(box: Container, timeout: float = 60) -> float:
    start = time.monotonic()
    verdict = box.health()
    while verdict != "healthy":
        if time.monotonic() - start > timeout:
            raise AssertionError(f"never healthy: {verdict}\n{box.logs()}")
        time.sleep(0.5)
        verdict = box.health()
    return time.monotonic() - start


def _token(image: str, env: dict[str, str], volumes: list[str], *args: str) -> str:
    """A token of the container's embedded issuer (same data volume as the server)."""
    return _run(image, f"aifa-token-{uuid.uuid4().hex[:6]}", env, volumes, "token", *args, detach=False)


def _call(base: str, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, base + path, headers={"Authorization": f"Bearer {token}"}, timeout=30, **kw)


def test_image_runs_as_non_root_healthy_and_a_job_settles(
        image: str, container: tuple[Container, dict[str, str], list[str]]) -> None:
    box, env, volumes = container
    took = _wait_healthy(box)
    print(f"healthy after {took:.1f} s")
    inspected = json.loads(podman("inspect", box.name).stdout)[0]
    assert inspected["Config"]["User"] == f"{UID}:{UID}"
    assert podman("exec", box.name, "id", "-u").stdout.strip() == str(UID)
    image_cfg = json.loads(podman("image", "inspect", image).stdout)[0]
    assert (image_cfg.get("Healthcheck") or {}).get("Test"), "the image has no HEALTHCHECK"
    assert image_cfg["Config"]["User"] == f"{UID}:{UID}"
    # only runtime dependencies: no pip, no compilers, no test tools in the image
    listing = podman("run", "--rm", *LIMITS, "--entrypoint", "/bin/sh", image, "-c",
                     "ls /opt/aifa-broker/bin; command -v gcc cc pytest || true").stdout.split()
    assert "aifa-broker" in listing and "pip" not in listing and "pytest" not in listing
    assert not any(p.endswith(("/gcc", "/cc")) for p in listing)
    # the dashboard's chart library is in the image
    r = httpx.get(box.base + "/dashboard/static/vendor/chart.umd.min.js", timeout=10)
    assert r.status_code == 200 and len(r.content) > 50_000

    admin = _token(image, env, volumes, "--sub", "ops", "--role", "quota_manager", "--role", "sysadmin")
    alice = _token(image, env, volumes, "--sub", "alice")
    definition = slurm.definition(RELEASE, "slurm_rest")
    definition["connection"]["jwt_key_file"] = KEY_IN_CONTAINER
    definition["poll_interval_seconds"] = 1
    r = _call(box.base, admin, "POST", "/v1/clusters", json=definition)
    assert r.status_code == 201, r.text
    cluster = definition["name"]
    code = f"EHPC-IMG-{uuid.uuid4().hex[:6].upper()}"
    for method, path, body in (
        ("POST", "/v1/projects", {"code": code, "title": "image test", "status": "active",
                                  "access_mode": "playground"}),
        ("POST", f"/v1/projects/{code}/allocations", {"cluster": cluster, "unit": "core_hours", "amount": 10,
                                                      "account": "proj-a"}),
        ("POST", f"/v1/projects/{code}/members", {"user": "alice", "role": "member"}),
        ("PUT", f"/v1/clusters/{cluster}/accounts/alice", {"username": "alice"}),
    ):
        r = _call(box.base, admin, method, path, json=body)
        assert r.status_code in (200, 201), r.text
    r = _call(box.base, alice, "POST", "/v1/jobs", json={
        "project": code, "cluster": cluster, "script": "#!/bin/bash\nsleep 2\necho from-the-container\n",
        "time_limit_minutes": 2})
    assert r.status_code == 201, r.text
    job = r.json()
    try:
        deadline = time.monotonic() + 120
        while job["charged"] is None and time.monotonic() < deadline:
            time.sleep(1)
            job = _call(box.base, alice, "GET", f"/v1/jobs/{job['id']}").json()
        assert job["state"] == "COMPLETED" and job["exit_code"] == 0, (job, box.logs())
        assert job["charged"]["amount"] > 0
        acct = slurm.sacct_job(RELEASE, job["scheduler_job_id"])
        assert acct["User"] == "alice" and acct["Account"] == "proj-a" and acct["State"] == "COMPLETED"
    finally:
        if job.get("scheduler_job_id") and job["state"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            slurm.run_in(RELEASE, "scancel", job["scheduler_job_id"], check=False)
    # the ledger of the container's database is consistent
    kinds = ledger_kinds(env["AIFA_BROKER_DATABASE_URL"], job["id"])
    assert kinds == ["reserve", "release", "charge"]
    check = podman("exec", box.name, "aifa-broker", "ledger", "check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def _kube_play_documents(image: str, pg_url: str, port: int) -> dict[str, Any]:
    """The rendered example overlay, cut to what ``podman kube play`` runs: the
    ConfigMap, the Secrets, the Deployment (one replica) and the migration Job's pod
    (podman plays no Job: its pod template as a Pod) — with the image under test,
    this test's database, host networking. Probes, security contexts, volumes and
    the Secret references stay as rendered."""
    import subprocess

    rendered = subprocess.run(["kubectl", "kustomize", str(slurm.ROOT / "deploy/k8s/overlays/example")],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    by_kind = {d["kind"]: d for d in docs if d["kind"] in ("ConfigMap", "Deployment", "Job")}
    config, deployment, job = by_kind["ConfigMap"], by_kind["Deployment"], by_kind["Job"]
    keys = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith(
        "aifa-broker-cluster-keys"))
    toml = config["data"]["broker.toml"]
    # this machine: embedded mode (no IdP here), no local cluster
    toml = toml.replace('mode = "production"', 'mode = "embedded"')
    config["data"]["broker.toml"] = toml.split("[[oidc_issuers]]")[0] + "register_local_cluster = false\n"
    secret_name = next(e["valueFrom"]["secretKeyRef"]["name"]
                       for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
                       if e["name"] == "AIFA_BROKER_DATABASE_URL")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret_name},
              "data": {"database-url": base64.b64encode(pg_url.encode()).decode()}}
    deployment["spec"]["replicas"] = 1
    migrate = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": job["metadata"]["name"], "labels": job["spec"]["template"]["metadata"]["labels"]},
               "spec": job["spec"]["template"]["spec"]}
    for pod in (deployment["spec"]["template"]["spec"], migrate["spec"]):
        pod["hostNetwork"] = True
        pod["containers"][0]["image"] = image
    api = deployment["spec"]["template"]["spec"]["containers"][0]
    api.pop("ports")  # host network: no port mappings (podman refuses them)
    api["env"].append({"name": "AIFA_BROKER_PORT", "value": str(port)})
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        api[probe]["httpGet"]["port"] = port
    for doc in (config, keys, deployment, migrate):
        doc["metadata"].pop("namespace", None)
    return {"config": config, "secrets": [secret, keys], "deployment": deployment, "migrate": migrate}


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def _until(what: str, pred: Any, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_k8s_manifests_run_under_podman_kube_play(image: str, pg_url: str, tmp_path: Path) -> None:
    """Deployment first (migrate_on_start = false: live but not ready on an empty
    database), then the migration Job's pod (exit 0, migrates), then ready."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (kustomize) missing")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    docs = _kube_play_documents(image, pg_url, port)
    # podman 4.3 stores a Secret document of kube play as YAML but reads a JSON map of
    # base64 values: the Secrets' data become podman secrets first, the rest is played
    for secret in docs["secrets"]:
        name = secret["metadata"]["name"]
        podman("secret", "rm", name, check=False)
        (tmp_path / f"{name}.json").write_text(json.dumps(secret["data"]))
        podman("secret", "create", name, str(tmp_path / f"{name}.json"))
    api_spec, job_spec = tmp_path / "deployment.yaml", tmp_path / "migrate.yaml"
    api_spec.write_text(yaml.safe_dump_all([docs["config"], docs["deployment"]]))
    job_spec.write_text(yaml.safe_dump_all([docs["config"], docs["migrate"]]))
    try:
        played = podman("kube", "play", "--network", "host", str(api_spec), timeout=180, check=False)
        assert played.returncode == 0, played.stderr
        _until("liveness", lambda: (r := _get(base + "/healthz")) is not None and r.status_code == 200)
        not_ready = _get(base + "/readyz")
        assert not_ready is not None and not_ready.status_code == 503 and "schema" in not_ready.text

        played = podman("kube", "play", "--network", "host", str(job_spec), timeout=180, check=False)
        assert played.returncode == 0, played.stderr
        def job_container() -> dict[str, Any] | None:
            listed = json.loads(podman("ps", "-a", "--format", "json", "--filter",
                                       "label=app.kubernetes.io/component=migrate").stdout)
            return next((c for c in listed if not c.get("IsInfra")), None)

        _until("the migration pod to finish",
               lambda: (c := job_container()) is not None and c["State"] in ("exited", "stopped"))
        job_ctr = job_container()
        assert job_ctr is not None
        assert job_ctr["ExitCode"] == 0, podman("logs", job_ctr["Id"], check=False).stderr
        assert "migrated to the newest revision" in podman("logs", job_ctr["Id"]).stdout

        _until("readiness", lambda: (r := _get(base + "/readyz")) is not None and r.status_code == 200)
        ps = json.loads(podman("ps", "--format", "json", "--filter", "label=app.kubernetes.io/component=api").stdout)
        cid = next(c["Id"] for c in ps if not c.get("IsInfra"))
        assert podman("exec", cid, "id", "-u").stdout.strip() == str(UID)
        # readOnlyRootFilesystem from the manifest holds
        assert podman("exec", cid, "sh", "-c", "touch /opt/x 2>&1 || echo read-only", check=False
                      ).stdout.strip().endswith("read-only")
    finally:
        for spec in (api_spec, job_spec):
            podman("kube", "down", str(spec), timeout=120, check=False)
        for secret in docs["secrets"]:
            podman("secret", "rm", secret["metadata"]["name"], check=False)
