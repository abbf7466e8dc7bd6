"""Every adapter submits the effective request — every field of it — and refuses a
script that still carries a directive (issue 8). The live counterparts are in
tests/e2e/test_directives_http.py and tests/integration/test_directives_property.py."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Any

import pytest

from adapters.local import LocalAdapter
from adapters.pyslurm_adapter import PySlurmAdapter
from adapters.slurm_rest.discovery import job_description_fields
from adapters.slurm_rest.layers import LAYERS
from adapters.slurm_rest.layers.v0040 import mail_flags
from adapters.slurm_rest.model import SubmitRequest
from adapters.slurm_ssh import commands
from broker.adapter import JobSpec, SubmitRejected
from broker.directives import effective_request
from broker.services.jobs import job_spec
from tests.contract import pyslurm_standin

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "slurm_rest"
SCRIPT = ("#!/bin/sh\n#SBATCH -N 1-2 -n 3 --gres=gpu:a100:1 --exclusive -C ib --mail-type=END,FAIL\n"
          "#SBATCH --mail-user=a@b.eu -t 9 -d afterok:" + "c" * 32 + "\nsrun true\n")


def full_spec(**over: Any) -> JobSpec:
    req = effective_request(script=SCRIPT, json_values={}, json_set=set())
    spec = job_spec(req, tag="a" * 32, username=getpass.getuser(), account="proj-a", partition="gpu",
                    dependency="afterok:17")
    return JobSpec(**{**spec.__dict__, **over})


def test_the_service_spec_is_the_effective_request() -> None:
    s = full_spec()
    assert (s.nodes, s.min_nodes, s.ntasks, s.ntasks_per_node, s.gpus_per_node, s.gpu_type) == (2, 1, 3, 2, 1, "a100")
    assert (s.exclusive, s.constraint, s.mail_type, s.mail_user, s.time_limit_minutes) == (
        True, "ib", "END,FAIL", "a@b.eu", 9)
    assert "\n##SBATCH -N 1-2" in s.script and "\n#SBATCH" not in s.script


def test_slurm_ssh_puts_every_field_on_the_command_line() -> None:
    argv = [a for a in commands.sbatch_argv(full_spec(), "/out", export_file=False) if isinstance(a, str)]
    for word in ("--ignore-pbs", "--nodes=1-2", "--ntasks=3", "--ntasks-per-node=2", "--gres=gpu:a100:1",
                 "--exclusive", "--constraint=ib", "--mail-type=END,FAIL", "--mail-user=a@b.eu",
                 "--dependency=afterok:17", "--time=9"):
        assert word in argv, word


@pytest.mark.parametrize("script", ["#!/bin/sh\n#SBATCH --gres=gpu:4\nx\n", "#!/bin/sh\n\n#SLURM -N 9\nx\n"])
def test_every_adapter_refuses_a_live_directive(script: str, tmp_path: Path) -> None:
    spec = full_spec(script=script, dependency=None, constraint=None, mail_type=None, mail_user=None,
                     gpu_type=None)
    with pytest.raises(SubmitRejected) as exc:
        commands.build_submit(spec, "o")
    assert exc.value.code == "unsupported_directive"
    with pytest.raises(SubmitRejected):
        PySlurmAdapter("c", {}, data_dir="/nonexistent", api=pyslurm_standin)._description(spec)
    with pytest.raises(SubmitRejected) as exc:
        LocalAdapter("l", {}, data_dir=str(tmp_path)).submit(JobSpec(**{**spec.__dict__, "partition": None}))
    assert exc.value.code == "unsupported_directive"


def test_local_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    with pytest.raises(SubmitRejected, match=r"dependency.*constraint.*mail.*GPU type") as exc:
        LocalAdapter("l", {}, data_dir=str(tmp_path)).submit(full_spec(partition=None))
    assert exc.value.code == "unsupported_request"


def test_pyslurm_description_carries_every_field() -> None:
    desc = PySlurmAdapter("c", {}, data_dir="/nonexistent", api=pyslurm_standin)._description(full_spec())
    assert (desc["nodes"], desc["ntasks"], desc["gres_per_node"], desc["resource_sharing"]) == (
        "1-2", 3, {"gpu:a100": 1}, "exclusive")
    assert (desc["constraints"], desc["mail_types"], desc["mail_user"], desc["dependencies"]) == (
        "ib", "END,FAIL", "a@b.eu", "afterok:17")


def _request() -> SubmitRequest:
    s = full_spec()
    return SubmitRequest(script=s.script, name="n", account="proj-a", comment="c", time_limit_minutes=9,
                         working_directory="/home/a", environment={}, partition="gpu", nodes=s.nodes,
                         ntasks_per_node=s.ntasks_per_node, cpus_per_task=1, gpus_per_node=1, ntasks=3,
                         min_nodes=1, gpu_type="a100", exclusive=True, constraint="ib", mail_type="END,FAIL",
                         mail_user="a@b.eu", array="0-3%2", dependency="afterok:17")


@pytest.mark.parametrize(("release", "version"), [("22.05", "v0.0.38"), ("24.11", "v0.0.40"), ("24.11", "v0.0.41"),
                                                  ("26.05", "v0.0.42"), ("26.05", "v0.0.45")])
def test_slurm_rest_bodies_carry_every_field_in_the_served_schema(release: str, version: str) -> None:
    api = LAYERS[version]()
    job = api.job_description(api.submit_body(_request()))
    accepted = job_description_fields(json.loads((FIXTURES / release / "openapi_v3.json").read_text()), version)
    assert accepted is not None and set(job) <= accepted
    assert (job["tasks"], job["constraints"], job["mail_user"], job["array"], job["dependency"]) == (
        3, "ib", "a@b.eu", "0-3%2", "afterok:17")
    if version == "v0.0.38":
        assert (job["nodes"], job["gres"], job["exclusive"], job["mail_type"]) == (
            [1, 2], "gpu:a100:1", "exclusive", "END,FAIL")
    else:
        assert (job["nodes"], job["tres_per_node"], job["shared"], job["mail_type"]) == (
            "1-2", "gres/gpu:a100:1", ["none"], ["END", "FAIL"])


def test_rest_mail_words_map_or_are_refused() -> None:
    assert mail_flags("all") == ["BEGIN", "END", "FAIL", "REQUEUE", "STAGE_OUT", "INVALID_DEPENDENCY"]
    assert mail_flags("TIME_LIMIT_90,END") == ["TIME=90%", "END"]
    with pytest.raises(SubmitRejected):
        mail_flags("SOMETIMES")
