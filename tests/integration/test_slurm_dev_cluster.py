"""The dev Slurm clusters that ``deploy/slurm-dev/up.sh`` brings up are usable.

For every release whose ``deploy/slurm-dev/generated/<release>/info.json`` exists
and whose ``status.sh`` says it is up: partitions ``cpu`` and ``gpu`` exist, a GPU
job submitted as alice runs and is accounted with ``gres/gpu`` in AllocTRES, and
alice can log in over SSH with a certificate signed by the cluster's CA while the
client pins the host key from the generated definition.

Run: ``.venv/bin/python -m pytest tests/integration/test_slurm_dev_cluster.py``
(as root; start clusters with ``make slurm-up [SLURM_RELEASE=24.11|26.05]``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

pytestmark = pytest.mark.slurm

SLURM_DEV = Path(__file__).resolve().parents[2] / "deploy" / "slurm-dev"
RELEASES = ("22.05", "24.11", "26.05")


class Cluster:
    def __init__(self, release: str, info: dict[str, Any]) -> None:
        self.release = release
        self.info = info
        self.root = Path(info["root"])
        gen = SLURM_DEV / "generated" / release
        with (gen / "slurm_ssh.toml").open("rb") as fh:
            self.ssh_def = tomllib.load(fh)

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SLURM_DEV / "run-in"), self.release, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def out(self, *argv: str) -> str:
        done = self.run(*argv)
        assert done.returncode == 0, f"{argv}: rc={done.returncode} {done.stderr}"
        return done.stdout


@pytest.fixture(scope="module", params=RELEASES, ids=lambda r: f"slurm-{r}")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    release: str = request.param
    hint = f"make slurm-up SLURM_RELEASE={release}"
    info_path = SLURM_DEV / "generated" / release / "info.json"
    if not info_path.exists():
        pytest.skip(f"Slurm {release} dev cluster never brought up here ({info_path} missing): {hint}")
    if os.geteuid() != 0:
        pytest.skip("the dev cluster checks run Slurm commands as root (run-in); not root")
    status = subprocess.run(
        [str(SLURM_DEV / "status.sh"), release], capture_output=True, text=True, timeout=60, check=False
    )
    if status.returncode != 0:
        problems = [ln.strip() for ln in status.stdout.splitlines() if " ok " not in ln]
        pytest.skip(f"Slurm {release} dev cluster is not up: {'; '.join(problems)} ({hint})")
    yield Cluster(release, json.loads(info_path.read_text()))


def test_partitions_cpu_and_gpu(cluster: Cluster) -> None:
    parts = cluster.out("sinfo", "-h", "-o", "%P").split()
    assert "cpu*" in parts, parts  # the default partition
    assert "gpu" in parts, parts
    gres = cluster.out("sinfo", "-h", "-p", "gpu", "-o", "%G").strip()
    assert "gpu:4" in gres, gres


def test_gpu_job_runs_and_is_accounted(cluster: Cluster) -> None:
    name = f"devcheck-{uuid.uuid4().hex[:8]}"
    out_file = f"/tmp/{name}.out"  # a path inside the release's root
    submit = cluster.run(
        "runuser", "-u", "alice", "--",
        "sbatch", "--parsable", "-A", "proj-a", "-p", "gpu", "--gres=gpu:2", "-t", "2",
        "-J", name, "-D", "/tmp", "-o", out_file,
        "--wrap", 'echo "gpus=$CUDA_VISIBLE_DEVICES"',
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    assert job_id.isdigit(), submit.stdout

    deadline = time.monotonic() + 90
    state = alloc = ""
    while time.monotonic() < deadline:
        line = cluster.out("sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,AllocTRES,User")
        if line.strip():
            state, alloc, user = line.strip().splitlines()[0].split("|")
            # Right after the end accounting may still show placeholders.
            if state == "COMPLETED" and "gres/gpu" in alloc:
                break
            assert state in {"PENDING", "RUNNING", "COMPLETING", "COMPLETED"}, line
        time.sleep(0.5)
    assert state == "COMPLETED", f"job {job_id} state {state!r}"
    assert "gres/gpu=2" in alloc, alloc
    assert user == "alice"
    output = (cluster.root / out_file.lstrip("/")).read_text()
    assert output.strip().startswith("gpus="), output
    assert len(output.strip().removeprefix("gpus=").split(",")) == 2, output


def _user_cert(ca_file: Path, principal: str, valid: timedelta) -> paramiko.PKey:
    """A fresh Ed25519 user key with a certificate signed by the CA at ca_file."""
    ca = serialization.load_ssh_private_key(ca_file.read_bytes(), password=None)
    user_key = ed25519.Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    cert = (
        serialization.SSHCertificateBuilder()
        .public_key(user_key.public_key())
        .serial(int(now.timestamp()))
        .type(serialization.SSHCertificateType.USER)
        .key_id(f"devcheck-{principal}".encode())
        .valid_principals([principal.encode()])
        .valid_after(int((now - timedelta(seconds=30)).timestamp()))
        .valid_before(int((now + valid).timestamp()))
        .sign(ca)  # type: ignore[arg-type]
    )
    pem = user_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(pem))
    pkey.load_certificate(cert.public_bytes().decode())  # str, not bytes
    return pkey


def _connect(conn: dict[str, Any], username: str, pkey: paramiko.PKey) -> paramiko.SSHClient:
    host, port = conn["host"], int(conn["port"])
    client = paramiko.SSHClient()
    key_type, key_b64 = conn["host_key"].split()[:2]
    pinned = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
    client.get_host_keys().add(f"[{host}]:{port}", key_type, pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls
    try:
        client.connect(
            host,
            port=port,
            username=username,
            pkey=pkey,
            sock=sock,
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
    except Exception:
        sock.close()
        client.close()
        raise
    return client


def test_ssh_certificate_login_with_pinned_host_key(cluster: Cluster) -> None:
    conn = cluster.ssh_def["connection"]
    assert conn["auth"] == "certificate"
    ca_file = Path(conn["ssh_ca_key_file"])
    client = _connect(conn, "alice", _user_cert(ca_file, "alice", timedelta(minutes=5)))
    try:
        _, stdout, stderr = client.exec_command("id -un; sinfo -h -o %P")
        lines = stdout.read().decode().split()
        assert stdout.channel.recv_exit_status() == 0, stderr.read()
    finally:
        client.close()
    assert lines[0] == "alice"
    assert "cpu*" in lines and "gpu" in lines  # Slurm works from the login shell too


def test_ssh_certificate_for_another_principal_is_refused(cluster: Cluster) -> None:
    conn = cluster.ssh_def["connection"]
    pkey = _user_cert(Path(conn["ssh_ca_key_file"]), "bob", timedelta(minutes=5))
    with pytest.raises(paramiko.AuthenticationException):
        _connect(conn, "alice", pkey).close()
