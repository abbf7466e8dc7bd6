"""Cluster registration checks the definition live: a slurmrestd that serves no API
version the adapter supports is refused at registration (not at the first job), and
one that serves several gets the newest supported. The slurmrestd here is a small
HTTP server on loopback replaying recorded OpenAPI documents (a real slurmrestd of
each release is exercised by the Slurm suites)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import BrokerEnv

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm_rest"


def _serve(openapi: dict[str, Any]) -> tuple[HTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            raw = json.dumps(openapi if self.path.startswith("/openapi/v3") else {"errors": [], "pings": []})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def slurmrestd(tmp_path: Path) -> Iterator[Any]:
    servers: list[HTTPServer] = []
    key = tmp_path / "jwt.key"
    key.write_bytes(b"k" * 32)

    def start(openapi: dict[str, Any]) -> dict[str, Any]:
        server, url = _serve(openapi)
        servers.append(server)
        return {"url": url, "auth": "jwt_key", "jwt_key_file": str(key), "query_username": "slurm"}

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_no_supported_version_is_refused_at_registration(env: BrokerEnv, slurmrestd: Any) -> None:
    connection = slurmrestd({"openapi": "3.0.2", "paths": {"/slurm/v0.0.39/ping": {}, "/slurm/v0.0.99/ping": {}}})
    r = env.call("POST", "/v1/clusters", env.qm, json={"name": "old-site", "adapter": "slurm_rest",
                                                       "connection": connection})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "cluster_misconfigured" and "version" in body["detail"]
    assert env.call("GET", "/v1/clusters/old-site", env.qm).status_code == 404


def test_several_versions_pick_the_newest_supported(slurmrestd: Any) -> None:
    from adapters.slurm_rest import SlurmRestAdapter

    openapi = json.loads((FIXTURES / "26.05" / "openapi_v3.json").read_text())  # serves v0.0.42 to v0.0.45
    adapter = SlurmRestAdapter("s", slurmrestd(openapi), data_dir="/tmp")
    try:
        assert adapter.api("slurm").version == "v0.0.45"
    finally:
        adapter.close()


# --- definitions that cannot work are refused with a sentence naming the problem (issue 9) ----

LOCAL = {"partitions": [{"name": "cpu", "cpus": 4, "memory_mb": 4096, "default": True}], "time_scale": 1}


def _register(env: BrokerEnv, **definition: Any) -> Any:
    return env.call("POST", "/v1/clusters", env.qm, json={"name": "site", **definition})


def _refused(r: Any, *words: str) -> str:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] in ("cluster_misconfigured", "validation_error"), body
    text = json.dumps(body)
    assert all(w in text for w in words), (words, body)
    return str(body["detail"])


def test_default_partition_the_cluster_lacks_is_refused(env: BrokerEnv) -> None:
    r = _register(env, adapter="local", connection=LOCAL, default_partition="gpu")
    assert r.json()["code"] == "cluster_misconfigured"
    _refused(r, "default_partition 'gpu' does not exist", "cpu")
    assert env.call("GET", "/v1/clusters/site", env.qm).status_code == 404


def test_cost_model_for_a_missing_partition_is_refused(env: BrokerEnv) -> None:
    model = {"partitions": {"gpu": {"gpu_hours": {"gres/gpu": 1}}, "*": {"core_hours": {"cpu": 1}}}}
    r = _register(env, adapter="local", connection=LOCAL, cost_model=model)
    assert r.json()["code"] == "cluster_misconfigured"
    _refused(r, "'gpu'", "cpu")
    ok = _register(env, adapter="local", connection=LOCAL, cost_model={"partitions": {"cpu": model["partitions"]["*"]}})
    assert ok.status_code == 201, ok.text


@pytest.mark.parametrize(("adapter", "connection", "misspelt", "meant"), [
    ("slurm_ssh", {"host": "127.0.0.1", "host_key": "ssh-ed25519 AAAA", "ssh_ca_key_file": "/k",
                   "max_chanels_per_connection": 4}, "max_chanels_per_connection", "max_channels_per_connection"),
    ("slurm_ssh", {"host": "127.0.0.1", "host_key": "ssh-ed25519 AAAA", "ssh_ca_key_file": "/k",
                   "conect_timeout": 3}, "conect_timeout", "connect_timeout"),
    ("slurm_rest", {"url": "http://127.0.0.1:9", "auth": "jwt_key", "jwt_key_file": "/k", "conect_timeout": 3},
     "conect_timeout", "connect_timeout"),
    ("local", {**LOCAL, "kill_grace_second": 1}, "kill_grace_second", "kill_grace_seconds"),
], ids=["ssh-channels", "ssh-timeout", "rest-timeout", "local-grace"])
def test_misspelt_connection_keys_are_refused(env: BrokerEnv, adapter: str, connection: dict, misspelt: str,
                                              meant: str) -> None:
    r = _register(env, adapter=adapter, connection=connection)
    assert r.json()["code"] == "cluster_misconfigured"
    _refused(r, f"'{misspelt}'", f"did you mean '{meant}'")


def test_unknown_adapter_lists_the_installed_ones(env: BrokerEnv) -> None:
    detail = json.dumps(_register(env, adapter="slurm-ssh", connection={}).json())
    assert "unknown adapter 'slurm-ssh'" in detail
    assert all(name in detail for name in ("local", "slurm_ssh", "slurm_rest", "pyslurm"))


def test_nothing_listening_is_refused(env: BrokerEnv, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = tmp_path / "k"
    key.write_bytes(b"k" * 32)
    r = _register(env, adapter="slurm_rest", connection={
        "url": f"http://127.0.0.1:{port}", "auth": "jwt_key", "jwt_key_file": str(key), "query_username": "slurm"})
    assert r.json()["code"] == "cluster_misconfigured"
    _refused(r, "does not answer", f"127.0.0.1:{port}")


def test_https_against_a_plain_http_slurmrestd_is_a_definition_error(env: BrokerEnv, slurmrestd: Any) -> None:
    connection = slurmrestd(json.loads((FIXTURES / "26.05" / "openapi_v3.json").read_text()))
    r = _register(env, adapter="slurm_rest", connection={**connection, "url": connection["url"].replace("http:", "https:")})
    assert r.json()["code"] == "cluster_misconfigured"
    _refused(r, "TLS", "plain-HTTP slurmrestd")
    from adapters.slurm_rest import SlurmRestAdapter
    from broker.adapter import AdapterConfigError

    adapter = SlurmRestAdapter("s", {**connection, "url": connection["url"].replace("http:", "https:")},
                               data_dir="/tmp")
    try:
        with pytest.raises(AdapterConfigError) as exc:  # permanent, never "transient"
            adapter.api("slurm")
        assert exc.value.code == "tls_error" and not exc.value.transient
    finally:
        adapter.close()


def test_health_is_ok_only_after_a_successful_probe(env: BrokerEnv) -> None:
    """A cluster with no live jobs was marked "answering polls" without any contact."""
    r = _register(env, adapter="local", connection={**LOCAL, "python": "/nonexistent/python3"})
    assert r.status_code == 201, r.text
    import sqlalchemy as sa

    with env.engine.begin() as conn:
        conn.execute(sa.text("UPDATE clusters SET health_ok = NULL, health_detail = NULL WHERE name = 'site'"))
    env.app.state.tracker.run_cycle(force=True)
    site = env.call("GET", "/v1/clusters/site", env.qm).json()
    assert site["health_ok"] is False and "not found" in site["health_detail"]
    assert site["unreachable_since"] is not None
    local = env.call("GET", "/v1/clusters/local", env.qm).json()
    assert local["health_ok"] is True  # probed: the local cluster answers
