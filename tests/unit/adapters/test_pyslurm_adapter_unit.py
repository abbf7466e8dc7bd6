"""pyslurm adapter details the contract suite does not reach."""

from __future__ import annotations

import getpass
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from adapters.pyslurm_adapter import PySlurmAdapter, _script_content, expand_output_pattern
from broker.adapter import (
    AdapterConfigError,
    ClusterUnreachable,
    JobSpec,
    SubmitOutcomeUnknown,
    SubmitRejected,
)
from tests.contract import pyslurm_standin


def make(**settings: Any) -> PySlurmAdapter:
    return PySlurmAdapter("c", settings, data_dir="/nonexistent", api=pyslurm_standin)


def spec(**kw: Any) -> JobSpec:
    base: dict[str, Any] = {"tag": "a" * 32, "username": getpass.getuser(), "account": "p",
                            "script": "echo hi", "time_limit_minutes": 5}
    return JobSpec(**{**base, **kw})


@pytest.mark.skipif(importlib.util.find_spec("pyslurm") is not None, reason="pyslurm installed")
def test_module_imports_without_pyslurm() -> None:
    with pytest.raises(AdapterConfigError, match="not installed"):
        PySlurmAdapter("c", {}, data_dir="/nonexistent")


def test_script_gets_shebang_and_cannot_be_a_path(tmp_path: Path) -> None:
    assert _script_content("echo hi") == "#!/bin/sh\necho hi"
    existing = tmp_path / "f"
    existing.write_text("x")
    assert "\n" in _script_content(f"#!{existing}")


def test_description_never_exports_broker_environment() -> None:
    desc = make()._description(spec())
    assert desc["environment"]["AIFA_BROKER_TAG"] == "a" * 32
    assert set(desc["environment"]) == {"PATH", "HOME", "USER", "LOGNAME", "AIFA_BROKER_TAG"}
    assert desc["name"].endswith(".aifa-" + "a" * 32)
    assert "user_id" in desc and "gres_per_node" not in desc


def test_unknown_posix_user_is_rejected() -> None:
    with pytest.raises(SubmitRejected) as err:
        make()._description(spec(username="no-such-user-xyz"))
    assert err.value.code == "no_cluster_account"


def test_bad_environment_name_is_rejected() -> None:
    with pytest.raises(SubmitRejected):
        make()._description(spec(environment={"A=B": "x"}))


@pytest.mark.parametrize(("errno", "submitting", "kind"), [
    (1800, False, ClusterUnreachable),
    (1802, True, SubmitOutcomeUnknown),
    (1802, False, ClusterUnreachable),
    (2000, True, SubmitRejected),
])
def test_error_mapping(errno: int, submitting: bool, kind: type) -> None:
    exc = pyslurm_standin.RPCError(errno, "boom")
    assert isinstance(make()._error(exc, "x", submitting=submitting), kind)


def test_output_pattern() -> None:
    assert expand_output_pattern("o-%j-%u-%%.out", "7", "bob", "/w") == "/w/o-7-bob-%.out"
    assert expand_output_pattern("/s/%u/%j", "7", "bob", "/w") == "/s/bob/7"
    with pytest.raises(AdapterConfigError):
        make(output_pattern="%x.out")
