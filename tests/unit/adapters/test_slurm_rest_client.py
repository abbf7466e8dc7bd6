"""The slurm_rest HTTP client and its transport against a real local HTTP/1.1 server
(keep-alive, threads, a server that drops connections, slow or chunked answers)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from adapters.slurm_rest.auth import Identity
from adapters.slurm_rest.client import POOL_CONNECTIONS, RestClient
from adapters.slurm_rest.settings import RestSettings
from broker.adapter import AdapterError, ClusterUnreachable, OutputTooLarge, SubmitOutcomeUnknown
from tests.contract.factory_slurm_ssh import closed_port

SUBMIT = "/slurm/v0.0.38/job/submit"
JOBS = "/slurm/v0.0.38/jobs"


class _Slurmrestd(BaseHTTPRequestHandler):
    """Answers after a short pause (so calls overlap), as ``mode`` says:
    ``ok``; ``drop_after`` (answers, then closes without saying so); ``no_answer``
    (closes without answering); ``slow`` (answers after 1 s); ``chunked``."""

    protocol_version = "HTTP/1.1"
    connections = 0
    mode = "ok"
    lock = threading.Lock()

    def setup(self) -> None:  # once per TCP connection
        with _Slurmrestd.lock:
            _Slurmrestd.connections += 1
        super().setup()

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        if self.mode == "no_answer":
            self.close_connection = True
            return
        time.sleep(1.0 if self.mode == "slow" else 0.02)
        body = json.dumps({"job_id": 7, "errors": [], "user": self.headers["X-SLURM-USER-NAME"],
                           "pad": "x" * (200_000 if self.mode == "chunked" else 0)}).encode()
        if self.mode in ("jobs", "jobs_then_error"):  # an accounting answer, errors after the jobs
            errors = [{"error_number": 1, "error": "slurmdbd gone"}] if self.mode == "jobs_then_error" else []
            body = json.dumps({"meta": {}, "jobs": [{"job_id": i, "pad": "y" * 1000} for i in range(2000)],
                               "errors": errors}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.mode in ("chunked", "jobs", "jobs_then_error"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for i in range(0, len(body), 10_000):
                    part = body[i:i + 10_000]
                    self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading at its cap
                self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        if self.mode == "drop_after":
            self.close_connection = True

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class _User(Identity):
    def headers(self, username: str) -> dict[str, str]:
        return {"X-SLURM-USER-NAME": username, "X-SLURM-USER-TOKEN": "t"}


@pytest.fixture
def server() -> Iterator[str]:
    _Slurmrestd.connections, _Slurmrestd.mode = 0, "ok"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Slurmrestd)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[RestClient] = []

    def build(url: str, **settings: Any) -> RestClient:
        conf = {"url": url, "auth": "proxy_token", "proxy_token_file": "/x", **settings}
        made.append(RestClient(RestSettings.from_mapping(conf), _User()))
        return made[-1]

    yield build
    for rest in made:
        rest.close()


def _submit(rest: RestClient) -> Any:
    return rest.request("POST", SUBMIT, username="alice", during="submit", body={"job": {}}, submitting=True)


def test_concurrent_calls_reuse_their_connections(server: str, make: Any) -> None:
    """12 threads × 8 calls at once: each connection opened is kept and reused (with
    httpcore's pool and a keep-alive limit below the calls in flight, one was closed
    at nearly every release and reopened — 91 connections — and one could be closed
    under a call)."""
    threads, calls = 12, 8
    assert threads <= POOL_CONNECTIONS
    rest = make(server)

    def one(i: int) -> object:
        if i % 2:
            return _submit(rest)["job_id"]
        return rest.get(JOBS, username="alice", during="job list")["user"]

    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(one, range(threads * calls)))
    assert answers == [7 if i % 2 else "alice" for i in range(threads * calls)]
    assert _Slurmrestd.connections <= threads


def test_a_connection_the_server_closed_is_not_used_for_a_submit(server: str, make: Any) -> None:
    """The server drops each connection after its answer without saying so: the next
    submit goes out on a new connection (on the dropped one it could only end as
    'outcome unknown')."""
    _Slurmrestd.mode = "drop_after"
    rest = make(server)
    for _ in range(3):
        assert _submit(rest)["job_id"] == 7
        time.sleep(0.05)  # the server's FIN arrives
    assert _Slurmrestd.connections == 3


def test_nothing_listening_is_unreachable_even_for_a_submit(make: Any) -> None:
    rest = make(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ClusterUnreachable) as info:
        _submit(rest)
    assert info.value.code == "cluster_unavailable"


def test_closed_without_an_answer(server: str, make: Any) -> None:
    """A submit the server read but never answered may have been run: outcome unknown.
    A GET is retried once on a new connection, then unreachable."""
    _Slurmrestd.mode = "no_answer"
    rest = make(server)
    with pytest.raises(SubmitOutcomeUnknown):
        _submit(rest)
    with pytest.raises(ClusterUnreachable):
        rest.get(JOBS, username="alice", during="job list")
    assert _Slurmrestd.connections == 3


def test_slow_answer_is_a_timeout(server: str, make: Any) -> None:
    _Slurmrestd.mode = "slow"
    rest = make(server, timeout=0.3)
    with pytest.raises(SubmitOutcomeUnknown):
        _submit(rest)
    with pytest.raises(ClusterUnreachable) as info:
        rest.get(JOBS, username="alice", during="job list")
    assert info.value.code == "command_timeout"


def test_chunked_answer_is_read_whole_or_refused_past_the_cap(server: str, make: Any) -> None:
    _Slurmrestd.mode = "chunked"
    rest = make(server)
    assert rest.get(JOBS, username="alice", during="job list", max_bytes=300_000)["pad"] == "x" * 200_000
    assert rest.get(JOBS, username="alice", during="job list")["user"] == "alice"  # the connection was kept
    assert _Slurmrestd.connections == 1
    with pytest.raises(OutputTooLarge):
        rest.get(JOBS, username="alice", during="job list", max_bytes=100_000)
    assert _submit(rest)["job_id"] == 7  # the half-read connection was dropped, not reused
    assert _Slurmrestd.connections == 2


def test_a_list_is_streamed_past_the_cap_one_element_at_a_time(server: str, make: Any) -> None:
    """An accounting answer of 2 MB through a 64 KB cap per element: every job, in
    order; errors after the jobs are raised once they arrive; a stream closed early
    drops its connection (not reused half-read)."""
    _Slurmrestd.mode = "jobs"
    rest = make(server)
    with pytest.raises(OutputTooLarge):
        rest.get(JOBS, username="alice", during="accounting", max_bytes=65_536)
    items = rest.stream_items(JOBS, key="jobs", username="alice", during="accounting", max_item_bytes=65_536)
    assert [job["job_id"] for job in items] == list(range(2000))
    _Slurmrestd.mode = "jobs_then_error"
    seen: list[Any] = []
    with pytest.raises(AdapterError, match="slurmdbd gone"):
        seen.extend(rest.stream_items(JOBS, key="jobs", username="alice", during="accounting",
                                      max_item_bytes=65_536))
    assert len(seen) == 2000
    _Slurmrestd.mode = "jobs"
    early = rest.stream_items(JOBS, key="jobs", username="alice", during="accounting", max_item_bytes=65_536)
    assert next(early)["job_id"] == 0
    early.close()
    _Slurmrestd.mode = "ok"
    before = _Slurmrestd.connections
    assert _submit(rest)["job_id"] == 7
    assert _Slurmrestd.connections == before + 1
