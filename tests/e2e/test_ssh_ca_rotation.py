"""SSH user-CA rotation as docs/operations.md describes it, on the Slurm 22.05 dev
cluster (slurm_ssh): the cluster definition moves to a key under a NEW file name →
jobs keep running through the new file (the old one is gone); a CA the login node
does not trust yet is refused at the update (live check), so the order "trust on
the login nodes first, then switch the broker" is enforced.

The dev cluster's sshd is not touched: the "new" trusted key is the dev CA under a
new file name, the untrusted one a freshly generated CA."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import slurm
from tests.support.env import BrokerEnv, broker_env

RELEASE = "22.05"
pytestmark = pytest.mark.slurm


def _job_settles(env: BrokerEnv, cluster: str) -> dict[str, Any]:
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": "EHPC-ROT-001", "cluster": cluster, "script": "#!/bin/bash\necho rotated\n",
        "time_limit_minutes": 2})
    assert r.status_code == 201, r.text
    job = env.wait_settled(r.json()["id"], env.auth("alice"), timeout=90)
    assert job["state"] == "COMPLETED", job
    return job


@pytest.mark.parametrize("release", [RELEASE], ids=lambda r: f"slurm-{r}")
def test_ssh_ca_rotation_through_a_new_key_file(release: str, tmp_path: Path) -> None:
    slurm.require_cluster(release)
    definition = slurm.definition(release, "slurm_ssh")
    ca_old, ca_new = tmp_path / "ssh_ca_2026a", tmp_path / "ssh_ca_2026b"
    shutil.copyfile(definition["connection"]["ssh_ca_key_file"], ca_old)
    ca_old.chmod(0o400)
    definition["connection"]["ssh_ca_key_file"] = str(ca_old)
    definition["poll_interval_seconds"] = 1
    url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    with broker_env(tmp_path, url) as env:
        r = env.call("POST", "/v1/clusters", env.qm, json=definition)
        assert r.status_code == 201, r.text
        cluster = definition["name"]
        env.setup_project("EHPC-ROT-001", amount=10, cluster=cluster, account="proj-a")
        _job_settles(env, cluster)

        # a CA the login node does not trust: refused at once, the cluster keeps its key
        untrusted = tmp_path / "ssh_ca_untrusted"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(untrusted)], check=True)
        r = env.call("PATCH", f"/v1/clusters/{cluster}", env.qm, json={
            "connection": {**definition["connection"], "ssh_ca_key_file": str(untrusted)}})
        assert r.status_code == 422 and r.json()["code"] == "cluster_misconfigured", r.text
        got = env.call("GET", f"/v1/clusters/{cluster}", env.qm).json()
        assert got["connection"]["ssh_ca_key_file"] == str(ca_old)

        # the trusted new key under a new file name; the old file is then removed
        shutil.copyfile(ca_old, ca_new)
        ca_new.chmod(0o400)
        r = env.call("PATCH", f"/v1/clusters/{cluster}", env.qm, json={
            "connection": {**definition["connection"], "ssh_ca_key_file": str(ca_new)}})
        assert r.status_code == 200, r.text
        ca_old.unlink()
        job = _job_settles(env, cluster)
        acct = slurm.sacct_job(release, job["scheduler_job_id"])
        assert acct["User"] == "alice" and acct["State"] == "COMPLETED"
