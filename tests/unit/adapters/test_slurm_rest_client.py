"""The slurm_rest HTTP client against a real local HTTP/1.1 server (keep-alive, threads)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from adapters.slurm_rest.auth import Identity
from adapters.slurm_rest.client import POOL_CONNECTIONS, RestClient
from adapters.slurm_rest.settings import RestSettings


class _Slurmrestd(BaseHTTPRequestHandler):
    """Answers every call after a short pause (so calls overlap) over keep-alive."""

    protocol_version = "HTTP/1.1"
    connections = 0
    lock = threading.Lock()

    def setup(self) -> None:  # once per TCP connection
        with _Slurmrestd.lock:
            _Slurmrestd.connections += 1
        super().setup()

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        time.sleep(0.02)
        body = json.dumps({"job_id": 7, "errors": [], "user": self.headers["X-SLURM-USER-NAME"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class _User(Identity):
    def headers(self, username: str) -> dict[str, str]:
        return {"X-SLURM-USER-NAME": username, "X-SLURM-USER-TOKEN": "t"}


@pytest.fixture
def server() -> Iterator[str]:
    _Slurmrestd.connections = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Slurmrestd)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_concurrent_calls_reuse_their_connections(server: str) -> None:
    """12 threads × 8 calls at once: each connection opened is kept and reused (with a
    keep-alive limit below the calls in flight, httpcore closed one at nearly every
    release and reconnected — 40+ connections — and could close one under a call)."""
    threads, calls = 12, 8
    assert threads <= POOL_CONNECTIONS
    rest = RestClient(RestSettings.from_mapping({"url": server, "auth": "proxy_token", "proxy_token_file": "/x"}),
                      _User())
    try:
        def one(i: int) -> object:
            if i % 2:
                return rest.request("POST", "/slurm/v0.0.38/job/submit", username="alice", during="submit",
                                    body={"job": {}}, submitting=True)["job_id"]
            return rest.get("/slurm/v0.0.38/jobs", username="alice", during="job list")["user"]

        with ThreadPoolExecutor(threads) as pool:
            answers = list(pool.map(one, range(threads * calls)))
    finally:
        rest.close()
    assert answers == [7 if i % 2 else "alice" for i in range(threads * calls)]
    assert _Slurmrestd.connections <= threads
