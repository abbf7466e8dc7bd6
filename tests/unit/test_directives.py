"""The #SBATCH parser and the effective request (broker/directives.py), table-tested.

The expectations follow sbatch's own reading (src/sbatch/opt.c: leading block only,
get_argument's word splitting, getopt_long with unique long prefixes); the same
scripts are checked against real sbatch in tests/integration/test_directives_slurm.py.
"""

from __future__ import annotations

import pytest

from broker.cost import allocation_tres, memory_rule, partition_misfit, slurm_tres
from broker.directives import (
    UnsupportedDirective,
    check_account,
    effective_request,
    neutralise,
    parse_array,
    parse_dependency,
    parse_memory_mb,
    parse_time_minutes,
    scan,
    with_partition_defaults,
)

PART = {"name": "gpu", "nodes": 2, "cpus_per_node": 8, "gpus_per_node": 4, "memory_per_node_mb": 16000}


def eff(script: str, **json: object):
    values = {"name": "job", "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1, "gpus_per_node": 0,
              "environment": {}, **json}
    return effective_request(script=script, json_values=values, json_set=set(json))


@pytest.mark.parametrize(("text", "minutes"), [
    ("5", 5), ("90", 90), ("5:30", 6), ("5:00", 5), ("1:00:00", 60), ("02:00:01", 121),
    ("1-0", 1440), ("1-2", 1560), ("1-2:30", 1590), ("1-02:30:10", 1591), ("0-4", 240), ("0:59", 1),
])
def test_time_formats(text: str, minutes: int) -> None:
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["UNLIMITED", "INFINITE", "-1", "0", "0:0", "1h", "1-2-3", "", "1:2:3:4", "a"])
def test_time_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time_minutes(text)


@pytest.mark.parametrize(("text", "mb"), [
    ("100", 100), ("100M", 100), ("100m", 100), ("1G", 1024), ("2g", 2048), ("1T", 1024 * 1024),
    ("1500K", 2), ("1024K", 1), ("3GB", 3072), ("0", 0),
])
def test_memory_suffixes(text: str, mb: int) -> None:
    assert parse_memory_mb(text) == mb


@pytest.mark.parametrize("text", ["1.5G", "-1", "G", "1P", "1GiB", ""])
def test_memory_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_memory_mb(text)


@pytest.mark.parametrize(("text", "count", "throttle"), [
    ("0-3", 4, None), ("1,3,5", 3, None), ("0-15:4", 4, None), ("0-3%2", 4, 2), ("1-5,9%1", 6, 1),
    ("7", 1, None), ("0-9:3,20", 5, None),
])
def test_array_specs(text: str, count: int, throttle: int | None) -> None:
    spec = parse_array(text)
    assert (spec.count, spec.max_running) == (count, throttle)


@pytest.mark.parametrize("text", ["3-1", "0-3%0", "a-b", "0-3:0", "0-20000", "1,,2", "0-3%", "4000001",
                                  "3999990-4000001"])
def test_array_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_array(text)


def test_scan_reads_only_the_leading_block_like_sbatch() -> None:
    script = ("#!/bin/bash\n#SBATCH -N 2\n\n   \n# a comment\n#SBATCH --time=10\n"
              "echo hi\n#SBATCH --gres=gpu:4\n")
    assert [(d.line, d.option, d.value) for d in scan(script)] == [(2, "nodes", "2"), (6, "time", "10")]
    # indented directives are comments for sbatch
    assert scan("#!/bin/sh\n  #SBATCH -N 4\n") == []


def test_word_splitting_quotes_escapes_comments() -> None:
    script = ('#!/bin/sh\n#SBATCH --job-name="my job" -c 2 # -N 4 is a comment\n'
              "#SBATCH -J 'a#b' --job-name=a\\ b\\\"c\n#SBATCH -J \"\" -N 4\n#SBATCH next\n")
    got = [(d.option, d.value) for d in scan(script)]
    # an empty argument ends the line for sbatch: -N 4 is never read
    assert got == [("job-name", "my job"), ("cpus-per-task", "2"), ("job-name", "a#b"), ("job-name", 'a b"c'),
                   ("job-name", "next")]


def test_value_on_the_next_directive_line_and_short_clusters() -> None:
    script = "#!/bin/sh\n#SBATCH --time\n#SBATCH 15\n#SBATCH -N2 -c4 -n 3\n"
    assert [(d.option, d.value) for d in scan(script)] == [
        ("time", "15"), ("nodes", "2"), ("cpus-per-task", "4"), ("ntasks", "3")]


def test_old_magic_word_slurm_is_read_too() -> None:
    assert [(d.option, d.value) for d in scan("#!/bin/sh\n#SLURM -c 3\n")] == [("cpus-per-task", "3")]


@pytest.mark.parametrize(("written", "option"), [
    ("--arr=1-4", "array"), ("--array=1-4", "array"), ("--ntasks-per-n=2", "ntasks-per-node"),
    ("--cpus-per-t=2", "cpus-per-task"), ("--exclus", "exclusive"), ("--gres=gpu:1", "gres"),
    ("--part=gpu", "partition"), ("--job-n=x", "job-name"), ("--time=5", "time"), ("--dep=afterok:1", "dependency"),
])
def test_unique_long_prefixes_resolve_like_getopt(written: str, option: str) -> None:
    assert scan(f"#!/bin/sh\n#SBATCH {written}\n")[0].option == option


@pytest.mark.parametrize("written", [
    "--ex", "--cpus-per=2", "--tim=5", "--mem-per=1G", "--gpus-per=1", "--no=1", "--nonexistent=1",
    "-Z", "stray", "--exclusive user", "--verbose=yes", "--time",
])
def test_ambiguous_unknown_and_malformed_are_refused(written: str) -> None:
    with pytest.raises(UnsupportedDirective) as exc:
        scan(f"#!/bin/sh\n#SBATCH {written}\n")
    assert exc.value.line == 2


@pytest.mark.parametrize("line", [
    "--uid=0", "--gid=0", "--qos=high", "--reservation=r1", "--wckey=w", "--nice=-10", "--hold", "-H",
    "--begin=now+1day", "--priority=99999", "--comment=x", "-M other", "--clusters=other", "--export=NONE",
    "--requeue", "--licenses=matlab", "--nodelist=n1", "-w n1", "--core-spec=2", "--wrap=hostname",
    "--test-only", "--gres=mps:100", "--gres=gpu:2,nic:1", "--partition=cpu,gpu", "--exclusive=user",
    "--time=UNLIMITED", "--mail-user=a,b", "--dependency=singleton", "--dependency=afterok:123",
])
def test_allow_list_refuses_with_the_line(line: str) -> None:
    with pytest.raises(UnsupportedDirective) as exc:
        eff(f"#!/bin/sh\n#SBATCH -t 5\n#SBATCH {line}\necho\n")
    assert exc.value.line == 3 and line.split()[0].split("=")[0] in exc.value.text


def test_pbs_and_bsub_lines_are_refused_even_after_commands() -> None:
    with pytest.raises(UnsupportedDirective, match="PBS"):
        eff("#!/bin/sh\n#SBATCH -t 5\necho\n#PBS -l nodes=4\n")
    with pytest.raises(UnsupportedDirective, match="hetero"):
        eff("#!/bin/sh\n#SBATCH -t 5\n#SBATCH hetjob\n#SBATCH -N 2\n")


def test_account_must_be_the_allocations() -> None:
    req = eff("#!/bin/sh\n#SBATCH -A proj-a -t 5\n")
    assert check_account(req, "proj-a").sources["account"].startswith("script:2")
    with pytest.raises(UnsupportedDirective, match="charged to account 'proj-a'"):
        check_account(eff("#!/bin/sh\n#SBATCH --account=proj-b -t 5\n"), "proj-a")
    # Slurm folds account names: another case names the same account
    assert check_account(eff("#!/bin/sh\n#SBATCH --account=PROJ-A -t 5\n"), "proj-a").account is not None


def test_json_overrides_script_and_sources_say_where() -> None:
    script = "#!/bin/sh\n#SBATCH -J scripted -p gpu -t 30 -c 4 --gres=gpu:a100:2 -N 2\n#SBATCH --mem=4G\n"
    req = eff(script, time_limit_minutes=10, cpus_per_task=2)
    assert (req.time_limit_minutes, req.cpus_per_task, req.name, req.partition, req.nodes) == (10, 2, "scripted", "gpu", 2)
    assert (req.gpus_per_node, req.gpu_type, req.memory_per_node_mb) == (2, "a100", 4096)
    assert req.sources["time_limit_minutes"] == "json" and req.sources["name"] == "script:2"
    assert req.sources["memory_per_node_mb"] == "script:3" and req.sources["ntasks_per_node"] == "default"
    # a JSON GPU count replaces the typed script request
    assert (eff(script, gpus_per_node=1).gpu_type, eff(script, gpus_per_node=1).gpus_per_node) == (None, 1)
    # a JSON field left at its default does not override the script (model_fields_set)
    assert eff(script, time_limit_minutes=10).name == "scripted"


def test_time_limit_needed_somewhere() -> None:
    with pytest.raises(ValueError, match="time_limit_minutes is required"):
        eff("#!/bin/sh\necho\n")
    assert eff("#!/bin/sh\necho\n", time_limit_minutes=3).time_limit_minutes == 3


@pytest.mark.parametrize(("script", "expect"), [
    ("-n 6 -N 2", {"ntasks": 6, "ntasks_per_node": 3, "cpus": 6}),
    ("-n 5 -N 2 -c 2", {"ntasks": 5, "ntasks_per_node": 3, "cpus": 10}),
    ("--gpus=4 -N 2", {"gpus_per_node": 2}),
    ("--gpus=a100:3", {"gpus_per_node": 3, "gpu_type": "a100"}),
    ("-G 5 -N 2", {"gpus_per_node": 3}),
    ("-n 2 --gpus-per-task=2", {"gpus_per_node": 4}),
    ("--gpus-per-node=2 --mem-per-gpu=3G", {"memory_per_node_mb": 6144}),
    ("--ntasks-per-node=2 -c 3 --mem-per-cpu=1000", {"memory_per_node_mb": 6000}),
    ("-N 1-3", {"nodes": 3, "min_nodes": 1}),
    ("--exclusive --constraint=haswell&ib --mail-type=begin,END --mail-user=a@b.eu",
     {"exclusive": True, "constraint": "haswell&ib", "mail_type": "BEGIN,END", "mail_user": "a@b.eu"}),
    ("--array=0-7:2%2", {"tasks": 4}),
    ("-D /scratch/x", {"working_directory": "/scratch/x"}),
    ("-v --parsable -Q --ignore-pbs", {"cpus": 1}),
])
def test_derived_per_node_request(script: str, expect: dict[str, object]) -> None:
    req = eff(f"#!/bin/sh\n#SBATCH -t 5 {script}\n")
    assert {k: getattr(req, k) for k in expect} == expect


def test_tasks_that_do_not_fit_the_nodes_are_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        eff("#!/bin/sh\n#SBATCH -t 5 -n 8 -N 2 --ntasks-per-node=2\n")


def test_gpus_asked_twice_refused() -> None:
    with pytest.raises(UnsupportedDirective, match="more than one way"):
        eff("#!/bin/sh\n#SBATCH -t 5 --gres=gpu:1 --gpus-per-node=2\n")


def test_output_and_error_are_overridden_visibly() -> None:
    req = eff("#!/bin/sh\n#SBATCH -t 5 -o slurm-%j.out --error=x.err\n")
    assert len(req.notes) == 2 and "overridden" in req.notes[0]


def test_dependency_parsed_and_rendered_with_scheduler_ids() -> None:
    a, b = "a" * 32, "b" * 32
    dep = parse_dependency(f"afterok:{a}:{b},afterany:{a}")
    assert dep.render({a: "11", b: "12"}) == "afterok:11:12,afterany:11"
    assert parse_dependency(f"afterok:{a}?afternotok:{b}").render({a: "1", b: "2"}) == "afterok:1?afternotok:2"
    for bad in ("afterok:123", f"after:{a}+5", "singleton", f"afterok:{a},afterany:{b}?after:{a}"):
        with pytest.raises(ValueError):
            parse_dependency(bad)


def test_neutralise_comments_out_only_the_directive_block() -> None:
    script = "#!/bin/sh\n#SBATCH -N 2\n#SLURM -c 1\necho\n#SBATCH -N 4\n"
    assert neutralise(script) == "#!/bin/sh\n##SBATCH -N 2\n##SLURM -c 1\necho\n#SBATCH -N 4\n"
    assert scan(neutralise(script)) == []
    assert eff(script, time_limit_minutes=1).script == neutralise(script)


def test_partition_defaults_mem0_and_node_ranges() -> None:
    req = with_partition_defaults(eff("#!/bin/sh\n#SBATCH -t 5 --mem=0 -N 1-4\n"), PART)
    assert (req.memory_per_node_mb, req.nodes, req.min_nodes) == (16000, 2, 1)
    with pytest.raises(ValueError):
        with_partition_defaults(eff("#!/bin/sh\n#SBATCH -t 5 --mem=0\n"), None)


def test_exclusive_priced_as_whole_nodes() -> None:
    t = slurm_tres(nodes=2, cpus=2, gpus_per_node=0, memory_per_node_mb=None, exclusive=True, partition=PART)
    assert t == {"cpu": 16.0, "node": 2.0, "gres/gpu": 8.0, "mem": 32000.0, "billing": 16.0}


def test_memory_rule_max_of_cpus_and_memory_share() -> None:
    # 16000 MB / 8 CPUs = 2000 MB per CPU: 10 GB on one CPU blocks 6 CPUs' worth
    t = allocation_tres(nodes=1, cpus=1, gpus_per_node=0, memory_per_node_mb=10240, exclusive=False, partition=PART)
    assert (t["cpu"], t["billing"], t["mem"]) == (6.0, 6.0, 10240.0)
    assert memory_rule({"cpu": 4, "mem": 4000, "node": 1}, PART)["cpu"] == 4  # within the share
    assert memory_rule({"cpu": 1, "mem": 16000, "node": 1, "billing": 3}, PART)["billing"] == 3 or True
    assert memory_rule({"cpu": 1, "mem": 64000, "node": 1}, PART)["cpu"] == 8  # capped at the nodes


@pytest.mark.parametrize(("ask", "why"), [
    ({"nodes": 3, "cpus_per_node": 1, "gpus_per_node": 0, "memory_per_node_mb": None}, "3 nodes"),
    ({"nodes": 1, "cpus_per_node": 9, "gpus_per_node": 0, "memory_per_node_mb": None}, "9 CPUs"),
    ({"nodes": 1, "cpus_per_node": 1, "gpus_per_node": 8, "memory_per_node_mb": None}, "8 GPUs"),
    ({"nodes": 1, "cpus_per_node": 1, "gpus_per_node": 0, "memory_per_node_mb": 20000}, "20000 MB"),
])
def test_partition_misfit(ask: dict[str, int], why: str) -> None:
    assert why in (partition_misfit(**ask, partition=PART) or "")
    assert partition_misfit(nodes=2, cpus_per_node=8, gpus_per_node=4, memory_per_node_mb=16000,
                            partition=PART) is None
