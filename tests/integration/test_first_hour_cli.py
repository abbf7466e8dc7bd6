"""What a first-hour user, quota manager and sysadmin meet on the command line
(issue 9): operator commands on a machine without the broker's database say so
(and create nothing); `demo` prints the URL the broker really serves and the
exports the CLI needs; `cluster add` of a definition that cannot work exits
non-zero with a sentence naming the problem."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker import config
from broker.cli import SERVED_URL_FILE, app


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """``aifa-broker ARGS`` with an empty data directory and no database configured."""
    for var in ("AIFA_BROKER_DATABASE_URL", "AIFA_BROKER_CONFIG", "AIFA_BROKER_PORT", "AIFA_BROKER_HOST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AIFA_BROKER_DATA_DIR", str(tmp_path / "data"))
    config.get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> Any:
        config.get_settings.cache_clear()
        out = runner.invoke(app, list(args))
        assert out.exit_code == code, (args, out.output)
        return out

    yield run
    config.get_settings.cache_clear()


@pytest.mark.parametrize("argv", [["project", "show", "EHPC-X"], ["ledger", "check"], ["cluster", "list"]])
def test_operator_commands_without_a_database_say_so(cli: Callable[..., Any], tmp_path: Path,
                                                    argv: list[str]) -> None:
    out = cli(*argv, code=1)
    assert "no broker database here" in out.output and "AIFA_BROKER_DATABASE_URL" in out.output
    assert "aifa-broker job" in out.output  # where to go from a user's machine
    assert not (tmp_path / "data" / "broker.sqlite3").exists()  # nothing created silently


def test_demo_prints_the_served_url_and_the_cli_exports(cli: Callable[..., Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFA_BROKER_PORT", "18123")
    out = cli("demo").output
    assert "export AIFA_BROKER_URL=http://127.0.0.1:18123" in out and "export AIFA_BROKER_TOKEN=ey" in out
    assert ":8080" not in out
    # a `serve` of this data directory runs on another port: demo prints that one
    (tmp_path / "data" / SERVED_URL_FILE).write_text(f"http://127.0.0.1:18777 {os.getpid()}\n")
    out = cli("demo").output
    assert "export AIFA_BROKER_URL=http://127.0.0.1:18777" in out and "18123" not in out
    assert "export AIFA_BROKER_URL=http://h:1" in cli("demo", "--url", "http://h:1").output
    # the operator commands find the database demo created
    shown = json.loads(cli("project", "show", "EHPC-AIF-DEMO-001").output)
    assert shown["allocations"][0]["cluster"] == "local"


def test_cluster_add_refuses_a_definition_that_cannot_work(cli: Callable[..., Any], tmp_path: Path) -> None:
    cli("db", "upgrade")
    path = tmp_path / "site.toml"
    path.write_text('name = "site"\nadapter = "local"\ndefault_partition = "gpu"\n'
                    '[connection]\npartitions = [{name = "cpu", cpus = 2, memory_mb = 1024}]\n')
    out = cli("cluster", "add", "--from-file", str(path), code=1)
    assert "default_partition 'gpu' does not exist on the cluster" in out.output
    assert "cluster_misconfigured" in out.output
    path.write_text('name = "site"\nadapter = "slurm-ssh"\n')
    out = cli("cluster", "add", "--from-file", str(path), code=1)
    assert "unknown adapter 'slurm-ssh'" in out.output and "slurm_ssh" in out.output
