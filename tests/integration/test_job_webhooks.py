"""Per-job notifications (issue 12 point 3): a job's own webhook, HMAC-signed like
the quota webhooks, retried with backoff, its delivery status on the job; URLs
outside the site's allow-list, and loopback/private addresses unless configured,
are refused before anything is reserved."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.job_webhooks import check_url, host_allowed
from broker.webhooks import verify_signature
from tests.support.env import BrokerEnv, broker_env
from tests.support.webhooks import webhook_receiver

SECRET = "s3cret-for-this-job-only"


def _job(env: BrokerEnv, notify: dict[str, Any], project: str = "EHPC-TEST-001") -> Any:
    """A job long enough for the tracker to see it RUNNING (minutes last seconds here)."""
    return env.call("POST", "/v1/jobs", env.auth("alice"), json={
        "project": project, "script": "#!/bin/sh\nsleep 2\n", "time_limit_minutes": 10, "notify": notify})


@pytest.fixture
def loopback_env(db_url: str, tmp_path: Path) -> Iterator[BrokerEnv]:
    """The loopback receiver explicitly allowed (host and private networks), fast retries."""
    with broker_env(tmp_path, db_url, job_webhook_hosts=["127.0.0.1"], job_webhook_allow_private_networks=True,
                    job_webhook_interval_seconds=0.2, webhook_backoff_seconds=0.5,
                    webhook_timeout_seconds=5) as e:
        yield e


def _wait(pred: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_delivered_once_signed_and_retried_after_a_failure(loopback_env: BrokerEnv) -> None:
    env = loopback_env
    env.setup_project()
    with webhook_receiver(script=[500]) as receiver:
        r = _job(env, {"url": receiver.url, "secret": SECRET, "on": ["running", "terminal"]})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["request"]["notify"] == {"url": receiver.url, "on": ["RUNNING", "TERMINAL"]}
        assert SECRET not in r.text
        env.wait_settled(job["id"], env.auth("alice"))
        _wait(lambda: {d.json["job"]["state"] for d in receiver.delivered()} == {"RUNNING", "COMPLETED"})
        time.sleep(1.5)  # nothing more arrives: each transition delivered once
        delivered = receiver.delivered()
        assert sorted(d.json["job"]["state"] for d in delivered) == ["COMPLETED", "RUNNING"]
        assert len(receiver.requests) == 3  # the first attempt failed (500) and was retried
        first, retry = receiver.requests[0], next(d for d in delivered if d.headers["x-aifa-delivery"]
                                                  == receiver.requests[0].headers["x-aifa-delivery"])
        assert first.status == 500 and first.body == retry.body  # same delivery, same body
        for got in receiver.requests:
            assert got.headers["x-aifa-event"] == "job.state_changed"
            assert verify_signature(SECRET, got.headers["x-aifa-timestamp"], got.body,
                                    got.headers["x-aifa-signature"])
            assert not verify_signature("another-secret-entirely", got.headers["x-aifa-timestamp"], got.body,
                                        got.headers["x-aifa-signature"])
            assert got.json["job"]["id"] == job["id"]
        # the delivery status, on the job (owner only; never the secret)
        status = env.call("GET", f"/v1/jobs/{job['id']}/notifications", env.auth("alice"))
        assert status.status_code == 200 and SECRET not in status.text
        notify = status.json()["notify"]
        assert notify["url"] == receiver.url
        by_state = {d["state"]: d for d in notify["deliveries"]}
        assert set(by_state) == {"RUNNING", "COMPLETED"}
        assert all(d["status"] == "delivered" for d in by_state.values())
        assert sorted(d["attempts"] for d in by_state.values()) == [1, 2]
        assert env.call("GET", f"/v1/jobs/{job['id']}/notifications", env.auth("mallory")).status_code == 404


def test_gives_up_after_the_configured_attempts(db_url: str, tmp_path: Path) -> None:
    with broker_env(tmp_path, db_url, job_webhook_hosts=["127.0.0.1"], job_webhook_allow_private_networks=True,
                    job_webhook_interval_seconds=0.2, webhook_backoff_seconds=0.2, webhook_max_attempts=3) as env, \
            webhook_receiver(script=[503] * 10) as receiver:
        env.setup_project()
        job = _job(env, {"url": receiver.url, "secret": SECRET}).json()
        env.wait_settled(job["id"], env.auth("alice"))

        def failed() -> bool:
            deliveries = env.call("GET", f"/v1/jobs/{job['id']}/notifications",
                                  env.auth("alice")).json()["notify"]["deliveries"]
            return bool(deliveries) and deliveries[0]["status"] == "failed"

        _wait(failed)
        (delivery,) = env.call("GET", f"/v1/jobs/{job['id']}/notifications",
                               env.auth("alice")).json()["notify"]["deliveries"]
        assert (delivery["state"], delivery["attempts"], delivery["last_status_code"]) == ("COMPLETED", 3, 503)
        assert len(receiver.requests) == 3


def test_private_and_unlisted_addresses_are_refused_by_default(db_url: str, tmp_path: Path) -> None:
    # any public host allowed, private networks not (the default)
    with broker_env(tmp_path, db_url, job_webhook_hosts=["*"]) as env, webhook_receiver() as receiver:
        env.setup_project()
        for url in (receiver.url, "http://10.1.2.3/hook", "http://192.168.0.7/x", "http://169.254.169.254/latest",
                    "http://[::1]:8080/", "http://localhost:9/hook", "https://user:pw@example.org/x",
                    "ftp://example.org/x"):
            r = _job(env, {"url": url, "secret": SECRET})
            assert (r.status_code, r.json()["code"]) == (422, "notify_refused"), (url, r.text)
        time.sleep(0.5)
        assert receiver.requests == []
        # nothing was reserved or submitted for the refused requests
        assert env.call("GET", "/v1/jobs", env.auth("alice")).json()["items"] == []
        project = env.call("GET", "/v1/projects/EHPC-TEST-001", env.auth("alice")).json()
        assert project["allocations"][0]["reserved"] == 0
        # a bad secret or state is a validation error like any other field
        r = _job(env, {"url": "https://example.org/x", "secret": "short"})
        assert (r.status_code, r.json()["code"]) == (422, "validation_error")
        r = _job(env, {"url": "https://example.org/x", "secret": SECRET, "on": ["SOMETIME"]})
        assert (r.status_code, r.json()["code"]) == (422, "validation_error")
    # the feature is off unless hosts are configured
    with broker_env(tmp_path / "off", db_url) as env:  # (same database, another project)
        env.setup_project("EHPC-TEST-OFF", account="proj-off")
        r = _job(env, {"url": "https://example.org/x", "secret": SECRET}, project="EHPC-TEST-OFF")
        assert (r.status_code, r.json()["code"]) == (422, "notify_refused")


def test_allow_list_patterns() -> None:
    assert host_allowed("hooks.example.org", ["hooks.example.org"])
    assert host_allowed("a.b.example.org", ["*.example.org"]) and not host_allowed("example.org", ["*.example.org"])
    assert not host_allowed("evil-example.org", ["*.example.org"])
    assert host_allowed("anything.test", ["*"]) and not host_allowed("x.org", [])
    assert not host_allowed("example.org.evil.test", ["example.org"])


def test_check_url_resolves_names_before_trusting_them(tmp_path: Path) -> None:
    from broker.config import Settings

    settings = Settings(data_dir=tmp_path, job_webhook_hosts=["*"])
    with pytest.raises(Exception, match="loopback, private or reserved"):
        check_url("http://localhost/x", settings)
    allowed = Settings(data_dir=tmp_path, job_webhook_hosts=["localhost"], job_webhook_allow_private_networks=True)
    assert check_url("http://localhost/x", allowed) == "http://localhost/x"
