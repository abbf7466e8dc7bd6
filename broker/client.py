"""A small Python client for the broker's HTTP API (what users script against).

    from broker.client import BrokerClient
    with BrokerClient("https://broker.example.eu", token) as broker:
        job = broker.submit(project="EHPC-AIF-2026A01-042", script=open("train.sh").read(),
                            time_limit_minutes=120, partition="gpu", gpus_per_node=4)
        done = broker.wait(job["id"])

Submissions always carry an ``Idempotency-Key`` (generated unless given), so the
client retries them safely after a lost connection or a 503 (honouring
``Retry-After``): the broker returns the first job, never a second one.
Errors raise :class:`BrokerAPIError` with the problem's ``status``, ``code``
and ``detail``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import httpx

RETRYABLE_STATUS = frozenset({502, 503, 504})


class BrokerAPIError(Exception):
    """A problem+json answer (or a transport failure after retries)."""

    def __init__(self, status: int, code: str, detail: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail
        self.problem = problem or {}


class BrokerClient:
    """Synchronous client; thread-safe like the underlying ``httpx.Client``."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0, retries: int = 4,
                 connect_timeout: float = 5.0, connect_retries: int = 1,
                 transport: httpx.BaseTransport | None = None) -> None:
        """``connect_timeout``/``connect_retries`` bound how long a broker that cannot be
        reached at all (wrong URL, down) is tried; lost answers keep ``retries``."""
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
                                  headers={"Authorization": f"Bearer {token}", "User-Agent": "aifa-broker-client"})
        self.retries = retries
        self.connect_retries = connect_retries

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- jobs ------------------------------------------------------------------------
    def submit(self, *, idempotency_key: str | None = None, **job: Any) -> dict[str, Any]:
        """Submit a job (fields as in the API's job request); retried safely."""
        key = idempotency_key or uuid.uuid4().hex
        return dict(self._request("POST", "/v1/jobs", json=job, headers={"Idempotency-Key": key}, retry=True))

    def estimate(self, **job: Any) -> dict[str, Any]:
        """Eligibility verdict, cost and remaining budget; submits nothing."""
        return dict(self._request("POST", "/v1/jobs/estimate", json=job, retry=True))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{job_id}", retry=True))

    def jobs(self, *, page_size: int = 100, **filters: str) -> Iterator[dict[str, Any]]:
        """Every visible job matching ``filters`` (project, state, cluster, user), newest first."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size, **filters, **({"cursor": cursor} if cursor else {})}
            page = self._request("GET", "/v1/jobs", params=params, retry=True)
            yield from page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/jobs/{job_id}"))

    def tasks(self, job_id: str) -> list[dict[str, Any]]:
        """An array job's tasks (state, exit code, charge each), in task order."""
        return list(self._request("GET", f"/v1/jobs/{job_id}/tasks", retry=True)["items"])

    def cancel_task(self, job_id: str, task: int) -> dict[str, Any]:
        """Cancel one task of an array job (the others go on)."""
        return dict(self._request("DELETE", f"/v1/jobs/{job_id}/tasks/{int(task)}"))

    def output(self, job_id: str, *, stream: str = "stdout", tail: int = 65536) -> str:
        return self.output_and_location(job_id, stream=stream, tail=tail)[0]

    def output_and_location(self, job_id: str, *, stream: str = "stdout", tail: int = 65536) -> tuple[str, str | None]:
        """The output's tail and where its file is (when the cluster's adapter can tell)."""
        response = self._send("GET", f"/v1/jobs/{job_id}/output", params={"stream": stream, "tail": tail},
                              retry=True)
        return response.text, response.headers.get("X-Output-Location")

    def wait(self, job_id: str, *, timeout: float = 3600.0, interval: float = 2.0) -> dict[str, Any]:
        """Wait until the job is settled (charged); raises TimeoutError after ``timeout``.

        Waits on the server (``GET /v1/jobs/{id}?wait_for=terminal``: the answer
        comes at the change, not at the next poll). ``interval`` only spaces the
        requests to a broker too old to hold them."""
        return self.wait_for(job_id, "terminal", timeout=timeout, interval=interval)

    def wait_for(self, job_id: str, state: str, *, timeout: float = 3600.0, interval: float = 2.0,
                 hold: float = 60.0) -> dict[str, Any]:
        """Wait until the job is at or past ``state`` (``RUNNING``, ``terminal``...; a job
        that ended answers every wait); raises TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            held = min(left, hold)
            asked = time.monotonic()
            try:
                response = self._send("GET", f"/v1/jobs/{job_id}", params={"wait_for": state, "timeout": held},
                                      retry=True, timeout=held + 30.0)
            except BrokerAPIError as exc:
                if exc.code != "too_many_streams":
                    raise
                # the caller holds its share of waits elsewhere: a plain read, then again later
                response = self._send("GET", f"/v1/jobs/{job_id}", retry=True)
            job = dict(response.json())
            done = response.headers.get("X-Wait-Satisfied")
            if done == "true" or (done is None and state.lower() == "terminal" and job.get("charged") is not None):
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:.0f} s")
            if done is None or time.monotonic() - asked < min(held, interval):
                time.sleep(min(interval, max(0.0, deadline - time.monotonic())))  # not held: an older broker

    def events(self, job_id: str | None = None, *, project: str | None = None, last_event_id: int | None = None,
               reconnect: bool = True, read_timeout: float = 60.0) -> Iterator[dict[str, Any]]:
        """Transitions as the broker streams them (Server-Sent Events) — of one job
        (ends after its terminal event) or of a project (``project=``, endless).

        A dropped connection is resumed with ``Last-Event-ID``: nothing is missed
        and nothing repeated. Each item is the event's data (``id``, ``job_id``,
        ``state``, ``previous_state``, ``pending_reason``, ``occurred_at``)."""
        if (job_id is None) == (project is None):
            raise ValueError("give a job id or a project, not both")
        path = f"/v1/jobs/{job_id}/events" if job_id else f"/v1/projects/{project}/events"
        last = last_event_id
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": str(last)} if last is not None else {})}
            try:
                with self._http.stream("GET", path, headers=headers,
                                       timeout=httpx.Timeout(30.0, read=read_timeout)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    for data in _sse_data(response.iter_lines()):
                        failures = 0
                        last = int(data["id"])
                        yield data
                        if job_id and data.get("state") in TERMINAL_STATES:
                            return
            except httpx.TransportError as exc:
                failures += 1
                if not reconnect or failures > self.retries:
                    raise BrokerAPIError(0, "connection_failed", str(exc)) from exc
                time.sleep(min(2 ** (failures - 1), 30))
                continue
            if not reconnect:
                return
            time.sleep(0.5)  # closed without an end: reconnect and resume

    def follow_output(self, job_id: str, *, stream: str = "stdout", interval: float = 2.0,
                      window: int = 1_048_576) -> Iterator[str]:
        """Yield the job's output as it grows, until the job has ended (``tail -f``).

        The API serves the last ``window`` bytes; while the file fits in it the
        text is exact. If it grew by more than ``window`` between two reads, a
        ``[... output skipped ...]`` line marks the gap."""
        seen = ""
        while True:
            job = self.job(job_id)
            ended = job.get("charged") is not None
            try:
                text = self.output(job["id"], stream=stream, tail=window) if job.get("scheduler_job_id") else None
            except BrokerAPIError as exc:
                if exc.status != 409 or ended:  # 409: not on the cluster yet / not readable yet
                    raise
                text = None
            if text is not None:
                fresh = _new_part(seen, text, window)
                if fresh:
                    yield fresh
                seen = text
            if ended:
                return
            time.sleep(interval)

    # --- budget ------------------------------------------------------------------------
    def budget(self, *, window_days: int = 14) -> dict[str, Any]:
        """The caller's projects: allocations, remaining, burn rate, projected exhaustion."""
        return dict(self._request("GET", "/v1/budget", params={"window_days": window_days}, retry=True))

    # --- projects ------------------------------------------------------------------------
    def projects(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/projects", retry=True))

    def usage(self, project: str, **params: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/projects/{project}/usage", params=params, retry=True))

    # --- transport ------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _send(self, method: str, path: str, *, retry: bool = False, **kwargs: Any) -> httpx.Response:
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
                # nothing reached the broker: a wrong URL or a broker that is down
                if attempt >= min(self.connect_retries, attempts - 1):
                    raise BrokerAPIError(0, "connection_failed",
                                         f"cannot reach the broker at {self.base_url}: {exc}") from exc
                time.sleep(0.5)
                continue
            except httpx.TransportError as exc:
                if attempt + 1 >= attempts:
                    raise BrokerAPIError(0, "connection_failed",
                                         f"no answer from the broker at {self.base_url}: {exc}") from exc
                time.sleep(min(2**attempt, 30))
                continue
            if response.status_code in RETRYABLE_STATUS and attempt + 1 < attempts:
                time.sleep(_retry_after(response, attempt))
                continue
            if response.status_code >= 400:
                raise _error(response)
            return response
        raise AssertionError("unreachable")


def _new_part(before: str, now: str, window: int) -> str:
    """What ``now`` (a tail of the output) adds to ``before`` (the previous tail)."""
    if now.startswith(before):
        return now[len(before):]
    if len(before) < window and len(now) < window:
        return now  # the file shrank or was rewritten: show it again
    anchor = before[-4096:]
    at = now.find(anchor)
    if at >= 0:
        return now[at + len(anchor):]
    return "[... output skipped ...]\n" + now


TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "SUBMIT_FAILED"})


def _sse_data(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON ``data`` of each Server-Sent Event (comments and ``retry:`` skipped)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield dict(json.loads("\n".join(data)))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        return min(float(response.headers.get("Retry-After", "")), 60.0)
    except ValueError:
        return float(min(2**attempt, 30))


def _error(response: httpx.Response) -> BrokerAPIError:
    try:
        problem = response.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    return BrokerAPIError(response.status_code, str(problem.get("code", "http_error")),
                          str(problem.get("detail", response.text[:500])), problem)
