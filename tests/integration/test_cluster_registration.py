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
