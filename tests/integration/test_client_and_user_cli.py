"""The Python client and ``aifa-broker job ...`` against a real server on loopback."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.client import BrokerAPIError, BrokerClient
from tests.support.env import BrokerEnv
from tests.support.server import live_server


def test_client_submits_waits_and_reads_output(env: BrokerEnv) -> None:
    env.setup_project()
    with live_server(env.app) as base, BrokerClient(base, env.token("alice")) as client:
        job = client.submit(project="EHPC-TEST-001", script="#!/bin/sh\necho from-client\n", time_limit_minutes=1)
        done = client.wait(job["id"], timeout=30, interval=0.2)
        assert done["state"] == "COMPLETED" and client.output(job["id"]) == "from-client\n"
        text, where = client.output_and_location(job["id"])
        # a `local` job's output file is on the broker's machine, and the API says where
        assert where == str(env.settings.data_dir / "local-jobs" / done["scheduler_job_id"] / "stdout")
        assert Path(where).read_text() == text == "from-client\n"
        assert [j["id"] for j in client.jobs(page_size=1)] == [job["id"]]
        assert client.projects()[0]["code"] == "EHPC-TEST-001"
        with pytest.raises(BrokerAPIError) as err:
            client.submit(project="EHPC-TEST-001", script="true", time_limit_minutes=10**6)
        assert err.value.status == 422 and err.value.code == "validation_error"
        with pytest.raises(BrokerAPIError) as err:
            client.job("0" * 32)
        assert (err.value.status, err.value.code) == (404, "not_found")


def test_client_retries_a_lost_answer_without_a_second_job(env: BrokerEnv) -> None:
    """The first answer is lost on the way back: the retry replays it (same key)."""
    env.setup_project()
    with live_server(env.app) as base:
        real = httpx.HTTPTransport()
        dropped: list[str] = []

        class LoseFirstAnswer(httpx.BaseTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                response = real.handle_request(request)
                if request.method == "POST" and not dropped:
                    response.read()
                    dropped.append(request.headers["idempotency-key"])
                    raise httpx.ReadError("connection reset", request=request)
                return response

        with real, BrokerClient(base, env.token("alice"), transport=LoseFirstAnswer()) as client:
            client.retries = 2
            job = client.submit(project="EHPC-TEST-001", script="true", time_limit_minutes=1)
            assert dropped and [j["id"] for j in client.jobs()] == [job["id"]]
        assert job["state"] in {"PENDING", "RUNNING", "COMPLETED"}


def test_user_cli_submit_show_list_cancel(env: BrokerEnv, tmp_path: Path) -> None:
    env.setup_project()
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/sh\n#SBATCH --job-name=train --time=10 -c 2\necho \"$GREETING\"\nsleep 30\n")
    runner = CliRunner()
    with live_server(env.app) as base:
        common = {"AIFA_BROKER_URL": base, "AIFA_BROKER_TOKEN": env.token("alice")}
        out = runner.invoke(app, ["job", "submit", str(script), "-p", "EHPC-TEST-001", "-t", "5",
                                  "--env", "GREETING=a, b; c", "--json"], env=common)
        assert out.exit_code == 0, out.output
        import json

        job = json.loads(out.output)
        assert job["request"]["environment"] == {"GREETING": "a, b; c"} and job["name"] == "train"
        # the broker read the script's #SBATCH lines; the command line's -t overrode --time
        req = job["request"]
        assert (req["time_limit_minutes"], req["sources"]["time_limit_minutes"]) == (5, "json")
        assert (req["cpus_per_task"], req["sources"]["cpus_per_task"], req["sources"]["name"]) == (2, "script:2", "script:2")
        env.wait_job(job["id"], env.auth("alice"), lambda j: j["state"] == "RUNNING")
        listed = runner.invoke(app, ["job", "list"], env=common)
        assert listed.exit_code == 0 and job["id"] in listed.output
        cancelled = runner.invoke(app, ["job", "cancel", job["id"]], env=common)
        assert cancelled.exit_code == 0, cancelled.output
        assert env.wait_settled(job["id"], env.auth("alice"))["state"] == "CANCELLED"
        shown = runner.invoke(app, ["job", "output", job["id"]], env=common)
        assert shown.stdout == "a, b; c\n"  # the file's place goes to stderr: stdout stays the output
        assert "# stdout file: " in shown.stderr and "local-jobs" in shown.stderr
        refused = runner.invoke(app, ["job", "submit", str(script), "-p", "EHPC-NOPE"], env=common)
        assert refused.exit_code == 1 and "[not_found]" in refused.output
        no_token = runner.invoke(app, ["job", "list"], env={"AIFA_BROKER_URL": base, "AIFA_BROKER_TOKEN": ""})
        assert no_token.exit_code == 1 and "no token" in no_token.output


def test_cli_with_a_wrong_broker_url_fails_fast_and_names_it() -> None:
    """Issue 9: a wrong AIFA_BROKER_URL waited 16 s and never named the URL."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    t0 = time.monotonic()
    result = CliRunner().invoke(app, ["job", "list"], env={"AIFA_BROKER_URL": url, "AIFA_BROKER_TOKEN": "t"})
    elapsed = time.monotonic() - t0
    assert result.exit_code == 1 and elapsed < 3, (elapsed, result.output)
    assert f"cannot reach the broker at {url}" in result.output and "AIFA_BROKER_URL" in result.output
