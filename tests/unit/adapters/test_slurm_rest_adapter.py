"""The slurm_rest adapter's logic against a fake slurmrestd (httpx.MockTransport).

The fake serves the recorded OpenAPI documents and job objects built from the
recorded samples; live behaviour is covered by the contract suite and
tests/integration/test_slurm_rest_live.py.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.slurm_common.states import ACCOUNTING_END_STATES
from adapters.slurm_rest import SlurmRestAdapter
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    ClusterUnreachable,
    JobSpec,
    OutputTooLarge,
    SchedulerJobRef,
    SubmitRejected,
)
from broker.states import JobState

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "slurm_rest"
NOW = int(datetime.now(tz=UTC).timestamp())
TAG_A = "a" * 32
TAG_B = "b" * 32


def load(*parts: str) -> Any:
    return json.loads(FIXTURES.joinpath(*parts).read_text())


def nv(number: int) -> dict[str, Any]:
    return {"set": True, "infinite": False, "number": number}


def queue_item(job_id: int, state: str, name: str = "job", user: str = "alice") -> dict[str, Any]:
    """A v0.0.42 job object built from the recorded sample."""
    item = copy.deepcopy(load("24.11", "v0.0.42", "rest_job_get.json")["jobs"][0])
    item.update(job_id=job_id, job_state=[state], name=name, user_name=user, comment="")
    item["submit_time"] = nv(NOW - 60)
    item["start_time"] = nv(0 if state == "PENDING" else NOW - 50)
    item["end_time"] = nv(NOW + 3000 if state in ("PENDING", "RUNNING") else NOW - 10)
    return item


def db_item(
    job_id: int,
    state: str,
    name: str = "job",
    user: str = "alice",
    account: str = "proj-a",
    elapsed: int = 40,
    limit: int = 5,
) -> dict[str, Any]:
    """A v0.0.42 slurmdb job built from the recorded sample."""
    item = copy.deepcopy(load("24.11", "v0.0.42", "rest_slurmdb_job.json")["jobs"][0])
    item.update(job_id=job_id, name=name, user=user, account=account)
    item["comment"] = {"administrator": "", "job": "", "system": ""}
    item["state"] = {"current": [state], "reason": "None"}
    item["time"].update(submission=NOW - 60, start=NOW - 50, end=NOW - 10, elapsed=elapsed, limit=nv(limit))
    return item


@dataclass
class FakeSlurmrestd:
    """Serves one release's OpenAPI document and configurable job lists."""

    release: str = "24.11"
    queue: list[dict[str, Any]] = field(default_factory=list)
    accounting: list[dict[str, Any]] = field(default_factory=list)
    accounting_error: dict[str, Any] | None = None
    delete_errors: list[dict[str, Any]] = field(default_factory=list)
    delete_status: list[dict[str, Any]] = field(default_factory=list)
    doc: dict[str, Any] | None = None
    requests: list[httpx.Request] = field(default_factory=list)
    submitted: list[dict[str, Any]] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/openapi/v3":
            return httpx.Response(200, json=self.doc or load(self.release, "openapi_v3.json"))
        if "/job/submit" in path:
            self.submitted.append(json.loads(request.content))
            return httpx.Response(200, json={"job_id": 4242, "step_id": "batch", "errors": [], "warnings": []})
        if request.method == "GET" and "/job/" in path:
            wanted = path.rstrip("/").rsplit("/", 1)[1]
            jobs = [j for j in self.queue if str(j["job_id"]) == wanted]
            if not jobs:
                return httpx.Response(
                    404, json={"errors": [{"error_number": 2017, "error": "Invalid job id specified"}]}
                )
            return httpx.Response(200, json={"jobs": jobs, "errors": []})
        if request.method == "DELETE":
            body = {"errors": self.delete_errors, "status": self.delete_status}
            return httpx.Response(500 if self.delete_errors else 200, json=body)
        if path.startswith("/slurmdb/") and path.rstrip("/").endswith("/jobs"):
            if self.accounting_error is not None:
                return httpx.Response(500, json={"errors": [self.accounting_error]})
            return httpx.Response(200, json={"jobs": self.accounting, "errors": []})
        if path.rstrip("/").endswith("/jobs"):
            return httpx.Response(200, json={"jobs": self.queue, "errors": []})
        if path.rstrip("/").endswith("/ping"):
            return httpx.Response(200, json={"pings": [{"hostname": "vm", "pinged": "UP", "responding": True}]})
        if "/partitions" in path:
            return httpx.Response(200, json=load("22.05", "v0.0.38", "live_partitions.json")["body"])
        if "/nodes" in path:
            return httpx.Response(200, json=load("22.05", "v0.0.38", "live_nodes.json")["body"])
        if "/slurmdb/" in path:
            return httpx.Response(200, json={"errors": []})
        return httpx.Response(404, json={"errors": [{"error": f"no {path}"}]})

    def calls(self, fragment: str) -> list[httpx.Request]:
        return [r for r in self.requests if fragment in r.url.path]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt.key"
    path.write_bytes(b"0123456789abcdef0123456789abcdef")
    return path


@pytest.fixture
def fake() -> FakeSlurmrestd:
    return FakeSlurmrestd()


@pytest.fixture
def make(key_file: Path, tmp_path: Path) -> Iterator[Any]:
    made: list[SlurmRestAdapter] = []

    def build(server: FakeSlurmrestd, **settings: Any) -> SlurmRestAdapter:
        conf = {
            "url": "http://slurm.test:6820",
            "auth": "jwt_key",
            "jwt_key_file": str(key_file),
            "query_username": "slurm",
            **settings,
        }
        adapter = SlurmRestAdapter("fake", conf, data_dir=str(tmp_path), transport=httpx.MockTransport(server.handler))
        made.append(adapter)
        return adapter

    yield build
    for adapter in made:
        adapter.close()


def ref(job_id: int, user: str = "alice") -> SchedulerJobRef:
    return SchedulerJobRef(job_id=str(job_id), username=user, submit_time=datetime.now(tz=UTC) - timedelta(minutes=2))


# ------------------------------------------------------------------ poll


def test_poll_is_one_queue_and_one_accounting_call(fake: FakeSlurmrestd, make: Any) -> None:
    fake.queue = [queue_item(1, "RUNNING"), queue_item(2, "PENDING"), queue_item(99, "RUNNING")]
    fake.accounting = [
        db_item(3, "COMPLETED"),
        db_item(4, "FAILED"),
        db_item(5, "COMPLETED", name="allocation", limit=0),  # placeholder
        db_item(77, "COMPLETED"),
    ]
    adapter = make(fake)
    adapter.api("slurm")
    before = adapter.request_count
    statuses = {s.job_id: s for s in adapter.poll([ref(i) for i in (1, 2, 3, 4, 5, 6)])}
    assert adapter.request_count - before == 2
    assert len(fake.calls("/slurm/v0.0.42/jobs")) == 1 and len(fake.calls("/slurmdb/v0.0.42/jobs")) == 1
    assert set(statuses) == {"1", "2", "3", "4", "5"}, "unknown job 6 omitted, 99 not asked"
    assert (statuses["1"].state, statuses["1"].final) == (JobState.RUNNING, False)
    assert statuses["1"].elapsed_seconds is not None and statuses["1"].end_time is None
    assert (statuses["2"].state, statuses["2"].final) == (JobState.PENDING, False)
    assert (statuses["3"].state, statuses["3"].final, statuses["3"].exit_code) == (JobState.COMPLETED, True, 0)
    assert statuses["3"].alloc_tres["gres/gpu"] == 1 and statuses["3"].elapsed_seconds == 40
    assert (statuses["4"].state, statuses["4"].final) == (JobState.FAILED, True)
    assert statuses["5"].final is False, "the placeholder record never settles"
    db_call = fake.calls("/slurmdb/")[-1]
    assert db_call.url.params["users"] == "alice"
    assert db_call.url.params["start_time"].startswith("now-")
    assert all(r.headers["X-SLURM-USER-NAME"] == "slurm" for r in fake.requests)


def test_poll_without_accounting_when_all_queued(fake: FakeSlurmrestd, make: Any) -> None:
    fake.queue = [queue_item(1, "RUNNING"), queue_item(2, "PENDING")]
    adapter = make(fake)
    assert len(adapter.poll([ref(1), ref(2)])) == 2
    assert not fake.calls("/slurmdb/")
    assert adapter.poll([]) == []


def test_poll_queue_terminal_needs_accounting(fake: FakeSlurmrestd, make: Any) -> None:
    fake.queue = [queue_item(1, "COMPLETED")]
    adapter = make(fake)
    (status,) = adapter.poll([ref(1)])
    assert status.state is JobState.COMPLETED and not status.final
    fake.accounting = [db_item(1, "COMPLETED")]
    (status,) = adapter.poll([ref(1)])
    assert status.final


def test_poll_groups_by_user_without_query_username(fake: FakeSlurmrestd, make: Any) -> None:
    fake.queue = [queue_item(1, "RUNNING", user="alice"), queue_item(2, "RUNNING", user="bob")]
    adapter = make(fake, query_username=None)
    assert len(adapter.poll([ref(1, "alice"), ref(2, "bob")])) == 2
    users = [r.headers["X-SLURM-USER-NAME"] for r in fake.calls("/slurm/v0.0.42/jobs")]
    assert sorted(users) == ["alice", "bob"]


def test_poll_survives_transient_accounting_failure(fake: FakeSlurmrestd, make: Any) -> None:
    fake.queue = [queue_item(1, "COMPLETED")]
    fake.accounting_error = {"error_number": 7000, "error": "Unable to connect to database"}
    (status,) = make(fake).poll([ref(1), ref(2)])
    assert status.job_id == "1" and not status.final


def test_poll_raises_permanent_accounting_failure(fake: FakeSlurmrestd, make: Any) -> None:
    fake.accounting_error = {"error_number": 2002, "error": "Access/permission denied"}
    with pytest.raises(AdapterError) as info:
        make(fake).poll([ref(1)])
    assert info.value.code == "permission_denied"


def test_poll_2205_exit_code_from_queue(make: Any) -> None:
    """22.05 accounting JSON loses exit codes; the queue's wait status has them."""
    live_jobs = load("22.05", "v0.0.38", "live_jobs.json")["body"]["jobs"]
    live_db = load("22.05", "v0.0.38", "live_slurmdb_jobs.json")["body"]["jobs"]
    server = FakeSlurmrestd(release="22.05", queue=live_jobs, accounting=live_db)
    statuses = {s.job_id: s for s in make(server).poll([ref(3), ref(4), ref(2)])}
    assert (statuses["3"].state, statuses["3"].exit_code, statuses["3"].final) == (JobState.FAILED, 3, True)
    assert (statuses["4"].state, statuses["4"].final) == (JobState.TIMEOUT, True)
    assert (statuses["2"].state, statuses["2"].exit_code) == (JobState.COMPLETED, 0)
    assert "users" not in server.calls("/slurmdb/")[-1].url.params, "dbv0.0.38 has no users filter"


def test_unreachable_poll_raises_cluster_unreachable(key_file: Path, tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    adapter = SlurmRestAdapter(
        "down",
        {"url": "http://127.0.0.1:9", "auth": "jwt_key", "jwt_key_file": str(key_file)},
        data_dir=str(tmp_path),
        transport=httpx.MockTransport(refuse),
    )
    with pytest.raises(ClusterUnreachable):
        adapter.poll([ref(1)])
    health = adapter.health()
    assert not health.ok and "cluster_unavailable" in health.detail
    adapter.close()


# ------------------------------------------------------------------ submit


SPEC = JobSpec(
    tag=TAG_A,
    username="alice",
    account="proj-a",
    script="#!/bin/sh\necho \"$X\" ';|&'\n",
    time_limit_minutes=5,
    name="train",
    partition="gpu",
    gpus_per_node=1,
    environment={"X": "it's $(not run)"},
)


@pytest.mark.parametrize(
    ("release", "gpu_field", "gpu_value"),
    [("22.05", "gres", "gpu:1"), ("24.11", "tres_per_node", "gres/gpu:1"), ("26.05", "tres_per_node", "gres/gpu:1")],
)
def test_submit_body_per_release(make: Any, release: str, gpu_field: str, gpu_value: str) -> None:
    server = FakeSlurmrestd(release=release)
    job_ref = make(server).submit(SPEC)
    assert (job_ref.job_id, job_ref.username, job_ref.tag) == ("4242", "alice", TAG_A)
    (body,) = server.submitted
    job = body["job"]
    assert job[gpu_field] == gpu_value
    assert job["name"] == f"train.aifa-{TAG_A}" and job["comment"] == f"aifa-broker:{TAG_A}"
    assert job["current_working_directory"] == "/home/alice"
    env = (
        job["environment"]
        if isinstance(job["environment"], dict)
        else dict(e.split("=", 1) for e in job["environment"])
    )
    assert env["X"] == "it's $(not run)" and env["PATH"] and env["HOME"] == "/home/alice"
    script = body.get("script", job.get("script"))
    assert script == SPEC.script
    (post,) = server.calls("/job/submit")
    assert post.headers["X-SLURM-USER-NAME"] == "alice"


def test_gpu_request_refused_when_version_lacks_the_field(make: Any) -> None:
    doc = load("24.11", "openapi_v3.json")
    props = doc["components"]["schemas"]["v0.0.42_job_desc_msg"]["properties"]
    del props["tres_per_node"]
    server = FakeSlurmrestd(doc=doc)
    with pytest.raises(SubmitRejected) as info:
        make(server).submit(SPEC)
    assert info.value.code == "unsupported_request" and "GPU request would be ignored" in str(info.value)
    assert not server.submitted, "nothing was sent"


def test_unknown_field_refused(make: Any) -> None:
    doc = load("24.11", "openapi_v3.json")
    del doc["components"]["schemas"]["v0.0.42_job_desc_msg"]["properties"]["memory_per_node"]
    server = FakeSlurmrestd(doc=doc)
    with pytest.raises(SubmitRejected, match="memory_per_node"):
        make(server).submit(JobSpec(**{**SPEC.__dict__, "gpus_per_node": 0, "memory_per_node_mb": 100}))
    assert not server.submitted


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"environment": {"BAD-NAME": "x"}}, "environment name"),
        ({"environment": {"X": "a\x00b"}}, "NUL"),
        ({"time_limit_minutes": 0}, "time_limit"),
        ({"nodes": 0}, "sizes"),
    ],
)
def test_invalid_spec(fake: FakeSlurmrestd, make: Any, change: dict[str, Any], problem: str) -> None:
    with pytest.raises(SubmitRejected, match=problem) as info:
        make(fake).submit(JobSpec(**{**SPEC.__dict__, **change}))
    assert info.value.code == "invalid_request" and not fake.submitted


def test_api_version_setting_prefers_older(make: Any) -> None:
    server = FakeSlurmrestd(release="26.05")
    adapter = make(server, api_version="v0.0.42")
    adapter.submit(SPEC)
    assert server.calls("/slurm/v0.0.42/job/submit")
    assert adapter.discovery.served == ("v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45")


# ------------------------------------------------------------------ cancel, output


def test_cancel(fake: FakeSlurmrestd, make: Any) -> None:
    adapter = make(fake)
    adapter.cancel(ref(1))
    (delete,) = fake.calls("/job/1")
    assert delete.method == "DELETE" and delete.headers["X-SLURM-USER-NAME"] == "alice"
    fake.delete_errors = [{"error_number": 2017, "error": "Invalid job id specified"}]
    adapter.cancel(ref(1))
    fake.delete_errors = [{"error_number": 2021, "error": "Job/step already completing or completed"}]
    adapter.cancel(ref(1))
    fake.delete_errors = [{"error_number": 2002, "error": "Access/permission denied"}]
    with pytest.raises(AdapterError) as info:
        adapter.cancel(ref(1, "bob"))
    assert info.value.code == "permission_denied"


def _kill_status(code: int, message: str) -> dict[str, Any]:
    return {
        "error": {"string": message, "code": code, "message": message},
        "step_id": "batch",
        "job_id": nv(1),
        "federation": {"sibling": ""},
    }


@pytest.mark.parametrize(
    ("status", "raised"),
    [
        ([], None),
        ([_kill_status(0, "No error")], None),
        ([_kill_status(2021, "Job/step already completing or completed")], None),
        ([_kill_status(2017, "Invalid job id specified")], None),
        ([_kill_status(2002, "Access/permission denied")], "permission_denied"),
    ],
)
def test_cancel_status_list_v0042(
    fake: FakeSlurmrestd, make: Any, status: list[dict[str, Any]], raised: str | None
) -> None:
    """v0.0.42+ report per-job signal failures in a 200 answer's ``status`` list."""
    fake.delete_status = status
    adapter = make(fake)
    if raised is None:
        adapter.cancel(ref(1))
    else:
        with pytest.raises(AdapterError) as info:
            adapter.cancel(ref(1))
        assert info.value.code == raised


@pytest.mark.parametrize(
    ("after", "raised"),
    [
        ("CANCELLED", None),
        ("COMPLETED", None),
        ("RUNNING", "cancel_refused"),
        ("PENDING", "cancel_refused"),
        (None, None),
    ],
)
def test_cancel_v0040_checks_the_job(make: Any, after: str | None, raised: str | None) -> None:
    """v0.0.40/41 answer 200 without errors when the signal was refused (live-checked)."""
    server = FakeSlurmrestd(release="24.11", queue=[queue_item(1, after)] if after else [])
    adapter = make(server, api_version="v0.0.40")
    if raised is None:
        adapter.cancel(ref(1))
    else:
        with pytest.raises(AdapterError) as info:
            adapter.cancel(ref(1, "bob"))
        assert info.value.code == raised
    checks = [r for r in server.calls("/slurm/v0.0.40/job/1") if r.method == "GET"]
    assert len(checks) == 1


def test_cancel_v0042_needs_no_check(fake: FakeSlurmrestd, make: Any) -> None:
    make(fake).cancel(ref(1))
    assert [r.method for r in fake.calls("/job/1")] == ["DELETE"]


def test_read_output_unavailable(fake: FakeSlurmrestd, make: Any) -> None:
    with pytest.raises(AdapterError) as info:
        make(fake).read_output(ref(1))
    assert info.value.code == "output_unavailable" and not info.value.transient


# ------------------------------------------------------------------ find_by_tag, usage


def test_find_by_tag_uses_names_not_comments(fake: FakeSlurmrestd, make: Any) -> None:
    fake.queue = [queue_item(7, "PENDING", name=f"train.aifa-{TAG_B}", user="bob")]
    fake.accounting = [db_item(5, "COMPLETED", name=f"x.aifa-{TAG_A}"), db_item(6, "COMPLETED", name="other")]
    found = make(fake).find_by_tag([TAG_A, TAG_B, "c" * 32], since=datetime.now(tz=UTC) - timedelta(hours=1))
    assert {t: (r.job_id, r.username) for t, r in found.items()} == {TAG_A: ("5", "alice"), TAG_B: ("7", "bob")}
    params = fake.calls("/slurmdb/")[-1].url.params
    assert 3600 <= int(params["start_time"].removeprefix("now-").removesuffix("seconds")) <= 4000
    assert "account" not in params
    # the reconciler names the waiting jobs' accounts: accounting is read for them only
    found = make(fake).find_by_tag([TAG_A], since=datetime.now(tz=UTC) - timedelta(hours=1),
                                   accounts=["proj-a", "proj-b"])
    assert found[TAG_A].job_id == "5"
    assert fake.calls("/slurmdb/")[-1].url.params["account"] == "proj-a,proj-b"


def test_find_by_tag_needs_query_username(fake: FakeSlurmrestd, make: Any) -> None:
    with pytest.raises(AdapterConfigError, match="query_username"):
        make(fake, query_username=None).find_by_tag([TAG_A])
    assert make(fake).find_by_tag([]) == {}


def test_usage_skips_malformed_and_unsettled(fake: FakeSlurmrestd, make: Any) -> None:
    broken_time = db_item(12, "COMPLETED")
    broken_time["time"] = "garbage"
    no_account = db_item(13, "COMPLETED", account="")
    fake.accounting = [
        db_item(10, "COMPLETED", name=f"t.aifa-{TAG_A}"),
        {"job_id": None, "state": {"current": ["COMPLETED"]}},
        "not an object",
        db_item(11, "RUNNING"),
        broken_time,
        no_account,
        db_item(14, "TIMEOUT", account="proj-b", user="bob"),
        db_item(15, "COMPLETED", name="allocation", limit=0),
    ]
    since = datetime.now(tz=UTC) - timedelta(hours=1)
    records = {r.job_id: r for r in make(fake).usage(since)}
    assert set(records) == {"10", "14"}
    rec = records["10"]
    assert (rec.account, rec.username, rec.state, rec.tag) == ("proj-a", "alice", JobState.COMPLETED, TAG_A)
    assert rec.alloc_tres["cpu"] == 1 and rec.elapsed_seconds == 40
    assert records["14"].state is JobState.TIMEOUT


def test_usage_filters_accounts_and_time(fake: FakeSlurmrestd, make: Any) -> None:
    fake.accounting = [db_item(10, "COMPLETED"), db_item(14, "COMPLETED", account="proj-b")]
    adapter = make(fake)
    assert [r.job_id for r in adapter.usage(datetime.now(tz=UTC) - timedelta(hours=1), accounts=["proj-a"])] == ["10"]
    assert fake.calls("/slurmdb/")[-1].url.params["account"] == "proj-a"
    assert adapter.usage(datetime.now(tz=UTC)) == [], "ended before since"
    naive = datetime.now(tz=UTC).replace(tzinfo=None) - timedelta(hours=1)
    assert len(adapter.usage(naive)) == 2


def _ended(job_id: int, seconds_ago: int, state: str = "COMPLETED") -> dict[str, Any]:
    item = db_item(job_id, state)
    item["time"].update(submission=NOW - seconds_ago - 60, start=NOW - seconds_ago - 50, end=NOW - seconds_ago)
    return item


@pytest.mark.parametrize(
    ("margin", "until_ago", "end_time", "kept"),
    [
        (None, None, "now", ["1", "2", "3"]),
        (None, 60, "now", ["1", "2"]),  # within the 60 s clock margin: slurmdbd up to now, filtered here
        (None, 1200, "now-1140seconds", ["1"]),  # widened by the margin, then filtered exactly
        (5, 1200, "now-1195seconds", ["1"]),  # a smaller margin reads less past the window
    ],
)
def test_usage_until_bounds_the_query_and_the_records(
    fake: FakeSlurmrestd, make: Any, margin: int | None, until_ago: int | None, end_time: str, kept: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End states and an ``end_time``: slurmdbd then selects by end time, so ``until``
    bounds the answer; the records are checked against it again here."""
    # NOW was taken at import; a full run gets here minutes later, and "until" is
    # compared with the adapter's own clock (5 minutes of slack): the test's time is now
    monkeypatch.setattr(sys.modules[__name__], "NOW", int(datetime.now(tz=UTC).timestamp()))
    fake.accounting = [_ended(1, 1800), _ended(2, 120, "FAILED"), _ended(3, 30, "CANCELLED")]
    now = datetime.fromtimestamp(NOW, tz=UTC)
    until = None if until_ago is None else now - timedelta(seconds=until_ago)
    adapter = make(fake) if margin is None else make(fake, usage_clock_margin_seconds=margin)
    records = adapter.usage(now - timedelta(hours=1), accounts=["proj-a"], until=until)
    assert [r.job_id for r in records] == kept
    params = fake.calls("/slurmdb/")[-1].url.params
    assert params.get_list("state") == list(ACCOUNTING_END_STATES)  # v0.0.42: repeated
    late = int(datetime.now(tz=UTC).timestamp()) - NOW  # relative; the clock moved on since NOW
    # the start: an hour back plus the margin (60 s unless set), not five minutes
    start = int(params["start_time"].removeprefix("now-").removesuffix("seconds"))
    assert 3600 + (margin or 60) <= start <= 3600 + (margin or 60) + late + 1
    given = params["end_time"]
    if end_time == "now":
        assert given == "now"
    else:
        expected = int(end_time.removeprefix("now-").removesuffix("seconds"))
        assert expected <= int(given.removeprefix("now-").removesuffix("seconds")) <= expected + late + 1


def test_usage_of_an_empty_window_asks_nothing(fake: FakeSlurmrestd, make: Any) -> None:
    since = datetime.now(tz=UTC) - timedelta(hours=1)
    assert make(fake).usage(since, until=since - timedelta(minutes=1)) == []
    assert fake.calls("/slurmdb/") == []


@pytest.mark.parametrize("chunked", [False, True])
def test_usage_answer_past_the_cap_is_output_too_large(fake: FakeSlurmrestd, make: Any, chunked: bool) -> None:
    """Refused by its Content-Length, or while reading when there is none; other reads
    (poll) are not capped."""
    fake.accounting = [_ended(i, 120) for i in range(1, 40)]
    body = json.dumps({"jobs": fake.accounting, "errors": []}).encode()
    plain = fake.handler

    def handler(request: httpx.Request) -> httpx.Response:
        if "/slurmdb/" not in request.url.path or "state" not in request.url.params:  # not a usage read
            return plain(request)
        if chunked:  # no Content-Length
            return httpx.Response(200, content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]))
        return httpx.Response(200, content=body)

    fake.handler = handler  # type: ignore[method-assign]
    adapter = make(fake, usage_max_response_bytes=len(body) - 1)
    since = datetime.now(tz=UTC) - timedelta(hours=1)
    with pytest.raises(OutputTooLarge) as info:
        adapter.usage(since)
    assert info.value.code == "output_too_large" and not info.value.transient
    assert len(make(fake, usage_max_response_bytes=len(body)).usage(since)) == 39
    fake.accounting = [db_item(i, "COMPLETED") for i in range(1, 40)]
    assert len(adapter.poll([ref(i) for i in range(1, 40)])) == 39


def test_usage_max_response_bytes_setting(fake: FakeSlurmrestd, make: Any) -> None:
    assert make(fake).config.usage_max_response_bytes == 16 * 1024 * 1024
    with pytest.raises(AdapterConfigError):
        make(fake, usage_max_response_bytes=0)


# ------------------------------------------------------------------ health, discover


def test_health_ok(fake: FakeSlurmrestd, make: Any) -> None:
    health = make(fake).health()
    assert health.ok, health.detail
    assert health.checks["api_version"] == "v0.0.42" and health.checks["slurmdbd"] == "ok"
    assert health.checks["slurm_release"] == "24.11.5"
    assert fake.calls("/slurmdb/v0.0.42/ping/")


def test_health_probe_without_query_username(fake: FakeSlurmrestd, make: Any) -> None:
    health = make(fake, query_username=None).health()
    assert health.ok and "set query_username" in health.detail


def test_discover(make: Any) -> None:
    parts = {p.name: p for p in make(FakeSlurmrestd(release="22.05")).discover()}
    assert set(parts) == {"cpu", "gpu"}
    assert parts["gpu"].gpus_per_node == 4 and parts["cpu"].cpus_per_node > 0
    assert parts["cpu"].default and not parts["gpu"].default


def test_threads_share_one_discovery_and_pool(fake: FakeSlurmrestd, make: Any) -> None:
    """Several threads may call one adapter: discovery happens once, every call works."""
    from concurrent.futures import ThreadPoolExecutor

    fake.queue = [queue_item(1, "RUNNING")]
    adapter = make(fake)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: adapter.poll([ref(1)]), range(32)))
    assert all(len(r) == 1 and r[0].state is JobState.RUNNING for r in results)
    assert len(fake.calls("/openapi/v3")) == 1
    assert len(fake.calls("/slurm/v0.0.42/jobs")) == 32
