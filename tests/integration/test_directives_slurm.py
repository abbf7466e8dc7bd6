"""The #SBATCH parser table-tested against Slurm itself (issue 8).

For a corpus of real-world-style batch scripts, submitted UNCHANGED with sbatch on
each dev cluster: the broker's effective request (broker.directives) and the TRES it
expects Slurm to allocate (broker.cost.slurm_tres) equal what ``sbatch --test-only``
reports (processors) and what a held submission read back with ``scontrol show job``
shows (nodes, GPUs, memory, time limit, job name, array tasks). Scripts the broker
refuses are checked to be refused or to mean something else to sbatch.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from broker.cost import slurm_tres
from broker.directives import effective_request, parse_array, with_partition_defaults
from tests.support.slurm import DEV, RELEASES, require_cluster, run_in

pytestmark = pytest.mark.slurm

H = "#!/bin/bash\n"
#: (id, script) — every one must be accepted by sbatch and by the broker
CORPUS: list[tuple[str, str]] = [
    ("finetune", H + "#SBATCH --job-name=finetune\n#SBATCH --partition=gpu\n#SBATCH --nodes=1\n"
     "#SBATCH --ntasks-per-node=1\n#SBATCH --cpus-per-task=4\n#SBATCH --gres=gpu:2\n#SBATCH --mem=8G\n"
     "#SBATCH --time=02:00:00\n#SBATCH --output=slurm-%j.out\n#SBATCH --error=slurm-%j.err\n\n"
     "module load cuda\nsrun python train.py\n"),
    ("mpi-short", H + "#SBATCH -N 1 -n 4 -t 30 -p cpu\nsrun ./a.out\n"),
    ("clustered", H + "#SBATCH -N1 -c2 -t1-00:00   # one day\n#SBATCH -J clustered\nhostname\n"),
    ("gpus-days", H + "#SBATCH --gpus=3 --time=0-4 -p gpu\n#SBATCH --job-name gpus\nnvidia-smi\n"),
    ("exclusive", H + "#SBATCH --exclusive\n#SBATCH -p gpu\n#SBATCH -t 10:30\nhostname\n"),
    ("mem-per-cpu", H + "#SBATCH --mem-per-cpu=1500 -c 3 -t 5\n#SBATCH --ntasks-per-node=1\nhostname\n"),
    ("array", H + "#SBATCH --array=0-3%2\n#SBATCH --gpus-per-node=1 -p gpu\n#SBATCH -t 5:00:00\necho $SLURM_ARRAY_TASK_ID\n"),
    ("prefixes", H + "#SBATCH --cpus-per-t=2 --ntasks-per-n=2 --arr=1-5:2 --time=45 --job-n=pfx\nhostname\n"),
    ("quoting", H + '#SBATCH --job-name="my job" # trailing comment\n#SBATCH --time 20\n\n# plain comment\n'
     "#SBATCH -c 3\necho hi\n#SBATCH --gres=gpu:4\n"),
    ("value-next-line", H + "#SBATCH --time\n#SBATCH 7\n#SBATCH -c\n#SBATCH 2\nhostname\n"),
    ("empty-arg", H + '#SBATCH -J "" -N 4\n#SBATCH emptyname -t 3\nhostname\n'),
    ("old-magic", H + "#SLURM -t 5 -c 2\nhostname\n"),
    ("mem-all", H + "#SBATCH --mem=0 -p cpu -t 5\nhostname\n"),
    ("mem-per-gpu", H + "#SBATCH -G 2 -N 1 --mem-per-gpu=2G -t 5 -p gpu\nhostname\n"),
    ("gpus-per-task", H + "#SBATCH --ntasks=2 --gpus-per-task=1 -t 5 -p gpu\nhostname\n"),
    ("node-range", H + "#SBATCH -N 1-2 -t 5\nhostname\n"),
    ("suffixes", H + "#SBATCH --mem=2048K -t 1:30\nhostname\n"),
    ("mem-tb", H + "#SBATCH --mem=3GB -t 2-0\nhostname\n"),
    ("mail-constraint-free", H + "#SBATCH --mail-type=END,FAIL --mail-user=alice@example.eu -t 5\nhostname\n"),
    ("typed-gres-free", H + "#SBATCH --gres=gpu:1 --mem=1G -t 5 -p gpu\nhostname\n"),
]


def _sbatch(release: str, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DEV / "run-in"), release, "runuser", "-u", "alice", "--", "sbatch", "-A", "proj-a",
                           *args], input=script, capture_output=True, text=True, timeout=60, check=False)


def _minutes(text: str) -> int:
    days, _, hms = text.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def _job(release: str, job_id: str) -> dict[str, str]:
    line = run_in(release, "scontrol", "-o", "show", "job", job_id)
    fields = dict(m.groups() for m in re.finditer(r"(\w[\w/:]*)=(\S*)", line))
    name = re.search(r"JobName=(.*?) UserId=", line)  # a name may hold spaces
    return {**fields, "JobName": name.group(1) if name else fields.get("JobName", "")}


def _tres(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}.get(value[-1:])
        out[name] = float(value[:-1]) * scale if scale else float(value)
    return out


def _partition(release: str, name: str) -> dict[str, Any]:
    part = dict(re.findall(r"(\w+)=(\S+)", run_in(release, "scontrol", "-o", "show", "partition", name)))
    node = dict(re.findall(r"(\w+)=(\S+)", run_in(release, "scontrol", "-o", "show", "node", part["Nodes"])))
    gpus = re.search(r"gpu(?::\w+)?:(\d+)", node.get("Gres", ""))
    return {"name": name, "nodes": int(part["TotalNodes"]), "cpus_per_node": int(node["CPUTot"]),
            "memory_per_node_mb": int(node["RealMemory"]), "gpus_per_node": int(gpus.group(1)) if gpus else 0}


@pytest.fixture(scope="module", params=RELEASES, ids=lambda r: f"slurm-{r}")
def release(request: pytest.FixtureRequest) -> str:
    require_cluster(request.param)
    return str(request.param)


@pytest.mark.parametrize(("name", "script"), CORPUS, ids=[c[0] for c in CORPUS])
def test_effective_request_equals_what_sbatch_reads(release: str, name: str, script: str) -> None:
    asked = effective_request(script=script, json_values={}, json_set=set())
    partition = asked.partition or "cpu"
    req = with_partition_defaults(asked, _partition(release, partition))
    expect = slurm_tres(nodes=req.nodes, cpus=req.cpus, gpus_per_node=req.gpus_per_node,
                        memory_per_node_mb=req.memory_per_node_mb, exclusive=req.exclusive,
                        partition=_partition(release, partition))
    test_only = _sbatch(release, script, "--test-only")
    assert test_only.returncode == 0, test_only.stderr
    m = re.search(r"using (\d+) processors on nodes \S+ in partition (\S+)", test_only.stderr)
    assert m, test_only.stderr
    assert (int(m.group(1)), m.group(2)) == (expect["cpu"], partition)

    held = _sbatch(release, script, "-H", "--parsable")
    assert held.returncode == 0, held.stderr
    job_id = held.stdout.strip().split(";")[0]
    try:
        job = _job(release, job_id)
        tres = _tres(job.get("ReqTRES") or job["TRES"])  # 24.11+ say ReqTRES for a pending job
        assert _minutes(job["TimeLimit"]) == req.time_limit_minutes
        assert job["JobName"] == (req.name if req.sources.get("name") else "sbatch")
        # the request as asked (a pending job shows its node range, min-max)
        low, _, high = job["NumNodes"].partition("-")
        if "nodes" in asked.sources:
            assert (int(low), int(high or low)) == (asked.min_nodes or asked.nodes, asked.nodes)
        else:  # sbatch leaves the count to Slurm (26.05: 1-ntasks); the broker submits its own
            assert int(low) <= req.nodes
        if not req.exclusive:  # a pending exclusive job still shows its task request
            assert tres.get("gres/gpu", 0.0) == expect["gres/gpu"]
            assert tres["cpu"] == expect["cpu"]
        if req.memory_per_node_mb is not None:
            assert tres["mem"] == expect["mem"]
        else:  # the site's DefMemPerCPU: never more than the share the broker prices
            assert tres["mem"] <= expect["mem"]
        if req.array is not None:  # Slurm's own rendering of the task ids, expanded
            assert parse_array(job["ArrayTaskId"]).task_ids == req.array.task_ids
            assert job.get("ArrayTaskThrottle", "0") == str(req.array.max_running or 0)
    finally:
        run_in(release, "scancel", job_id, check=False)


@pytest.mark.parametrize(("name", "script"), [
    ("ambiguous-prefix", H + "#SBATCH --ex -t 5\nhostname\n"),
    ("ambiguous-cpus-per", H + "#SBATCH --cpus-per=2 -t 5\nhostname\n"),
    ("unknown-option", H + "#SBATCH --no-such-option=1 -t 5\nhostname\n"),
    ("stray-word", H + "#SBATCH -t 5 oops\nhostname\n"),
    ("missing-value", H + "#SBATCH -t 5 --job-name\nhostname\n"),
    ("crlf", H.replace("\n", "\r\n") + "#SBATCH -c 2 -t 5\r\nhostname\r\n"),
], ids=lambda v: v if isinstance(v, str) and "\n" not in v else "")
def test_what_sbatch_refuses_the_broker_refuses(release: str, name: str, script: str) -> None:
    with pytest.raises(ValueError):  # UnsupportedDirective is a ValueError too
        effective_request(script=script, json_values={}, json_set=set())
    assert _sbatch(release, script, "--test-only").returncode != 0
