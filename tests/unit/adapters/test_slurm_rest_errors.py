"""Slurm error classification and the HTTP transport's exception mapping."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.slurm_rest import errors
from adapters.slurm_rest.auth import Identity
from adapters.slurm_rest.client import RestClient
from adapters.slurm_rest.settings import RestSettings
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterUnreachable,
    SubmitOutcomeUnknown,
    SubmitRejected,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "slurm_rest"
SECRET = "tok-SECRET-never-shown"


def live(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / "22.05" / "v0.0.38" / f"live_{name}.json").read_text())


@pytest.mark.parametrize(
    ("item", "code", "kind"),
    [
        (
            {"error_code": 2045, "error": "Invalid account or account/partition combination specified"},
            "invalid_account",
            "reject",
        ),
        ({"error_number": 2045, "description": "whatever"}, "invalid_account", "reject"),
        ({"error_number": 2000, "error": "Invalid partition name specified"}, "invalid_partition", "reject"),
        ({"error": "Invalid qos specification"}, "invalid_qos", "reject"),
        (
            {
                "error_number": 2050,
                "error": "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)",
            },
            "qos_limit",
            "reject",
        ),
        (
            {"error_number": 2014, "error": "Requested node configuration is not available"},
            "resources_unavailable",
            "reject",
        ),
        ({"error_number": 2017, "error": "Invalid job id specified"}, "job_not_found", "gone"),
        ({"error_number": 2021, "error": "Job/step already completing or completed"}, "job_already_done", "gone"),
        ({"error_number": 2002, "error": "Access/permission denied"}, "permission_denied", "reject"),
        (
            {"error_number": 5004, "error": "Socket timed out on send/recv operation"},
            "scheduler_timeout",
            "unreachable",
        ),
        (
            {"error_number": 1800, "error": "Unable to contact slurm controller (connect failure)"},
            "cluster_unavailable",
            "unreachable",
        ),
        ({"error_number": 7000, "error": "Unable to connect to database"}, "accounting_unavailable", "unreachable"),
        (
            {"error_number": -1, "error": "Unspecified error", "description": "Failed while looking for jobs"},
            "cluster_unavailable",
            "unreachable",
        ),
        ({"error_number": 11, "error": "Resource temporarily unavailable"}, "scheduler_busy", "busy"),
        ({"error": "Protocol authentication error"}, "auth_failed", "config"),
        ({"error_number": 9999, "error": "something new"}, "cluster_error", "other"),
        ({"error_number": 9003, "error": "Nothing found with query", "description": "Nothing found"},
         "empty_result", "empty"),
    ],
)
def test_classify(item: dict[str, Any], code: str, kind: str) -> None:
    (error,) = errors.errors_in({"errors": [item]})
    found = errors.classify(error)
    assert (found.code, found.kind) == (code, kind)


def test_errors_in_ignores_junk() -> None:
    assert errors.errors_in({"errors": []}) == []
    assert errors.errors_in({"errors": None}) == []
    assert errors.errors_in([1, 2]) == []
    found = errors.errors_in({"errors": ["plain text", 5, {"error_number": 0, "error": "x"}]})
    assert [(e.number, e.text) for e in found] == [(None, "plain text"), (None, "x")]


@pytest.mark.parametrize(
    ("code", "submitting", "cls", "transient", "result_code"),
    [
        ("invalid_account", True, SubmitRejected, False, "invalid_account"),
        ("invalid_account", False, AdapterError, False, "invalid_account"),
        ("scheduler_timeout", True, SubmitOutcomeUnknown, True, "submit_outcome_unknown"),
        ("scheduler_timeout", False, ClusterUnreachable, True, "scheduler_timeout"),
        ("cluster_unavailable", True, ClusterUnreachable, True, "cluster_unavailable"),
        ("scheduler_busy", True, ClusterUnreachable, True, "scheduler_busy"),
        ("auth_failed", True, AdapterConfigError, False, "auth_failed"),
    ],
)
def test_exception_by_context(
    code: str, submitting: bool, cls: type[AdapterError], transient: bool, result_code: str
) -> None:
    kind = next(rule[2] for rule in errors._RULES if rule[2].code == code)
    exc = errors.exception_for(kind, "msg", submitting=submitting)
    assert type(exc) is cls and exc.transient is transient and exc.code == result_code


# ------------------------------------------------------------------ transport mapping


class _StaticIdentity(Identity):
    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def headers(self, username: str) -> dict[str, str]:
        return {"X-SLURM-USER-NAME": username, "X-SLURM-USER-TOKEN": SECRET}

    def forget(self, username: str) -> None:
        self.forgotten.append(username)


def client(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[RestClient, _StaticIdentity]:
    identity = _StaticIdentity()
    settings = RestSettings.from_mapping(
        {"url": "http://slurm.test:6820", "auth": "proxy_token", "proxy_token_file": "/nonexistent"}
    )
    return RestClient(settings, identity, transport=httpx.MockTransport(handler)), identity


def respond(status: int, body: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json=body)


def raise_(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


SUBMIT_CASES = [
    # 22.05: HTTP 500 with errors[].error_code
    (respond(500, live("submit_bad_account")["body"]), SubmitRejected, "invalid_account"),
    (respond(500, live("submit_bad_partition")["body"]), SubmitRejected, "invalid_partition"),
    # 24.11: HTTP 500 with errors[].error_number/description
    (
        respond(
            500,
            {
                "errors": [
                    {
                        "description": "Invalid account or account/partition combination specified",
                        "error_number": 2045,
                        "error": "Invalid account or account/partition combination specified",
                        "source": "slurm_submit_batch_job()",
                    }
                ],
                "warnings": [],
            },
        ),
        SubmitRejected,
        "invalid_account",
    ),
    # 26.05: HTTP 422
    (
        respond(
            422,
            {"errors": [{"error_number": 2045, "error": "Invalid account or account/partition combination specified"}]},
        ),
        SubmitRejected,
        "invalid_account",
    ),
    # errors inside a 200 answer are errors
    (
        respond(200, {"job_id": 5, "errors": [{"error_number": 2050, "error": "Job violates accounting/QOS policy"}]}),
        SubmitRejected,
        "qos_limit",
    ),
    (
        respond(200, {"errors": [{"error_number": 5004, "error": "Socket timed out on send/recv operation"}]}),
        SubmitOutcomeUnknown,
        "submit_outcome_unknown",
    ),
    (raise_(httpx.ConnectError("Connection refused")), ClusterUnreachable, "cluster_unavailable"),
    (raise_(httpx.ConnectTimeout("connect timed out")), ClusterUnreachable, "cluster_unavailable"),
    (raise_(httpx.ReadTimeout("read timed out")), SubmitOutcomeUnknown, "submit_outcome_unknown"),
    (raise_(httpx.RemoteProtocolError("Server disconnected")), SubmitOutcomeUnknown, "submit_outcome_unknown"),
    (respond(502, {}), ClusterUnreachable, "cluster_unavailable"),
    (respond(500, {"meta": {}}), SubmitOutcomeUnknown, "submit_outcome_unknown"),
    (respond(400, {"meta": {}}), SubmitRejected, "submit_rejected"),
    (lambda r: httpx.Response(200, text="not json"), AdapterError, "bad_response"),
]


@pytest.mark.parametrize(("handler", "cls", "code"), SUBMIT_CASES)
def test_submit_failures(
    handler: Callable[[httpx.Request], httpx.Response], cls: type[AdapterError], code: str
) -> None:
    rest, _ = client(handler)
    with pytest.raises(cls) as info:
        rest.request(
            "POST", "/slurm/v0.0.40/job/submit", username="alice", during="submit", body={"job": {}}, submitting=True
        )
    assert type(info.value) is cls and info.value.code == code
    assert SECRET not in str(info.value)
    rest.close()


@pytest.mark.parametrize(
    ("handler", "cls", "code", "transient"),
    [
        (raise_(httpx.ConnectError("Connection refused")), ClusterUnreachable, "cluster_unavailable", True),
        (raise_(httpx.ReadTimeout("read timed out")), ClusterUnreachable, "command_timeout", True),
        (raise_(httpx.RemoteProtocolError("Server disconnected")), ClusterUnreachable, "cluster_unavailable", True),
        (respond(500, live("delete_unknown")["body"]), AdapterError, "job_not_found", False),
        (respond(500, {"errors": [{"error": "brand new failure"}]}), AdapterError, "cluster_error", True),
        (respond(404, {}), AdapterError, "endpoint_not_found", False),
        (
            respond(200, {"errors": [{"error_number": 7000, "error": "Unable to connect to database"}]}),
            ClusterUnreachable,
            "accounting_unavailable",
            True,
        ),
    ],
)
def test_query_failures(
    handler: Callable[[httpx.Request], httpx.Response], cls: type[AdapterError], code: str, transient: bool
) -> None:
    rest, _ = client(handler)
    with pytest.raises(cls) as info:
        rest.get("/slurm/v0.0.40/jobs/", username="slurm", during="job list")
    assert info.value.code == code and info.value.transient is transient
    # the same failure of a streamed answer (usage import's over-cap window) is the same error
    with pytest.raises(cls) as info:
        list(rest.stream_items("/slurm/v0.0.40/jobs/", key="jobs", username="slurm", during="job list",
                               max_item_bytes=1 << 20))
    assert info.value.code == code and info.value.transient is transient
    rest.close()


@pytest.mark.parametrize("status", [401, 403])
def test_auth_refused_is_config_error_and_drops_token(status: int) -> None:
    rest, identity = client(lambda r: httpx.Response(status, text="Authentication failure"))
    with pytest.raises(AdapterConfigError) as info:
        rest.get("/openapi/v3", username="alice", during="openapi")
    assert info.value.code == "auth_failed" and identity.forgotten == ["alice"]
    assert SECRET not in str(info.value)
    rest.close()


def test_get_retries_once_after_dropped_connection() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"jobs": []})

    rest, _ = client(handler)
    assert rest.get("/slurm/v0.0.40/jobs/", username="slurm", during="job list") == {"jobs": []}
    assert len(calls) == 2 and rest.calls == 2
    rest.close()


def test_a_stream_is_retried_once_after_a_dropped_connection_before_its_answer() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"jobs": [{"job_id": 1}], "errors": []})

    rest, _ = client(handler)
    assert list(rest.stream_items("/slurmdb/v0.0.40/jobs", key="jobs", username="slurm", during="accounting",
                                  max_item_bytes=1 << 20)) == [{"job_id": 1}]
    assert len(calls) == 2
    rest.close()


def test_submit_is_never_retried() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.RemoteProtocolError("Server disconnected")

    rest, _ = client(handler)
    with pytest.raises(SubmitOutcomeUnknown):
        rest.request("POST", "/x", username="alice", during="submit", body={}, submitting=True)
    assert len(calls) == 1
    rest.close()


def test_headers_sent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    rest, _ = client(handler)
    rest.get("/slurm/v0.0.40/ping/", username="bob", during="ping", params={"a": "now-60seconds"})
    assert seen[0].headers["X-SLURM-USER-NAME"] == "bob"
    assert seen[0].headers["X-SLURM-USER-TOKEN"] == SECRET
    assert seen[0].url.params["a"] == "now-60seconds"
    rest.close()


def test_nothing_found_in_a_200_answer_is_an_empty_result() -> None:
    """22.05's answer (recorded live) to an accounting query that matches nothing."""
    body = {"meta": {}, "errors": [{"description": "Nothing found", "error_number": 9003,
                                    "error": "Nothing found with query", "source": "slurmdb_jobs_get"}],
            "jobs": []}
    rest, _ = client(respond(200, body))
    assert rest.get("/slurmdb/v0.0.38/jobs", username="slurm", during="accounting")["jobs"] == []
    assert list(rest.stream_items("/slurmdb/v0.0.38/jobs", key="jobs", username="slurm", during="accounting",
                                  max_item_bytes=1 << 20)) == []
    rest.close()
    # alongside a real error, the real error still counts
    rest, _ = client(respond(200, {**body, "errors": [*body["errors"], {"error_number": 7000,
                                                                        "error": "Unable to connect to database"}]}))
    with pytest.raises(ClusterUnreachable):
        rest.get("/slurmdb/v0.0.38/jobs", username="slurm", during="accounting")
    rest.close()
