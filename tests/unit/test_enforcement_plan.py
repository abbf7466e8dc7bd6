"""The enforcement planner and the sacctmgr command builder (pure functions; the real
clusters are exercised in tests/integration/test_slurm_enforcement.py)."""

from __future__ import annotations

import pytest

from adapters.slurm_ssh.sacctmgr import SacctmgrManager, parse_assoc_lines, parse_tres
from broker.accounting import AccountingChange, AccountingSnapshot, Association
from broker.services.enforcement import DesiredAccount, plan, tres_minutes

MODEL = {"partitions": {"gpu": {"gpu_hours": {"gres/gpu": 1.0}, "billing_hours": {"cpu": 0.25, "gres/gpu": 8.0}},
                        "big": {"gpu_hours": {"gres/gpu": 2.0}}}}


def test_tres_minutes_uses_the_strictest_weight_and_floors() -> None:
    assert tres_minutes({}, ["cpu"], "gpu_hours", 50_000) == {"gres/gpu": 3}  # 0.05 h = 3 GPU-min
    # 'big' charges 2 per GPU-hour: 100 GPU-hours buy only 3000 GPU-minutes there
    assert tres_minutes(MODEL, ["gpu", "big"], "gpu_hours", 100_000_000) == {"gres/gpu": 3000}
    # 'big' has no billing_hours weights: the defaults (Slurm's billing TRES) apply there
    assert tres_minutes(MODEL, ["gpu"], "billing_hours", 16_000_000) == {"cpu": 3840, "gres/gpu": 120,
                                                                          "billing": 960}
    only_gpu = {"partitions": {"gpu": MODEL["partitions"]["gpu"]}}
    assert tres_minutes(only_gpu, ["gpu"], "billing_hours", 16_000_000) == {"cpu": 3840, "gres/gpu": 120}
    assert tres_minutes({}, [], "core_hours", 1_999_999) == {"cpu": 119}  # never rounds up
    assert tres_minutes({}, [], "billing_hours", 1_000_000) == {"billing": 60}


def _snap(*assoc: Association) -> AccountingSnapshot:
    return AccountingSnapshot("c", frozenset(a.account for a in assoc if a.user is None),
                              frozenset(a.user for a in assoc if a.user), tuple(assoc))


def test_plan_creates_corrects_and_removes() -> None:
    want = {"acc": DesiredAccount("acc", True, {"gres/gpu": 60}, {"alice", "bob"})}
    assert [(c.action, c.user) for c in plan(want, _snap())] == [
        ("add_account", None), ("add_association", "alice"), ("add_association", "bob")]
    have = _snap(Association("acc", grp_tres_mins={"gres/gpu": 30, "cpu": 5}), Association("acc", "bob"),
                 Association("acc", "mallory"))
    changes = plan(want, have)
    assert changes[0] == AccountingChange("set_limit", "acc", grp_tres_mins={"gres/gpu": 60, "cpu": -1},
                                          reason="Slurm has {'gres/gpu': 30, 'cpu': 5}")
    assert [(c.action, c.user) for c in changes[1:]] == [("add_association", "alice"),
                                                        ("remove_association", "mallory")]
    in_sync = _snap(Association("acc", grp_tres_mins={"gres/gpu": 60}), Association("acc", "alice"),
                    Association("acc", "bob"))
    assert plan(want, in_sync) == []
    ended = {"acc": DesiredAccount("acc", False)}
    assert [(c.action, c.user) for c in plan(ended, in_sync)] == [
        ("remove_association", "alice"), ("remove_association", "bob"), ("remove_account", None)]
    assert plan(ended, _snap()) == []


def test_sacctmgr_commands_are_argv_with_validated_names() -> None:
    argv = SacctmgrManager.argv_for(AccountingChange("add_account", "aifa-1", grp_tres_mins={"gres/gpu": 6}), "dev")
    assert argv == [["sacctmgr", "-i", "add", "account", "aifa-1", "cluster=dev", "description=aifa-broker allocation",
                     "organization=aifa-broker"],
                    ["sacctmgr", "-i", "modify", "account", "where", "name=aifa-1", "cluster=dev", "set",
                     "GrpTRESMins=gres/gpu=6"]]
    assert SacctmgrManager.argv_for(AccountingChange("remove_association", "a", user="bob"), "dev") == [
        ["sacctmgr", "-i", "remove", "user", "where", "name=bob", "account=a", "cluster=dev"]]
    for bad in ("x y", "-rf", "a;b", "a=b", "a,b", "$(id)", "", "a'b"):
        with pytest.raises(ValueError):
            SacctmgrManager.argv_for(AccountingChange("add_association", "acct", user=bad), "dev")
        with pytest.raises(ValueError):
            SacctmgrManager.argv_for(AccountingChange("add_account", bad), "dev")
    with pytest.raises(ValueError):
        SacctmgrManager.argv_for(AccountingChange("set_limit", "a", grp_tres_mins={"gpu;rm": 1}), "dev")


def test_sacctmgr_output_parsing() -> None:
    rows = parse_assoc_lines("acc||gres/gpu=3,cpu=10|root\nacc|alice||\n\nbroken\n")
    assert rows == [Association("acc", None, {"gres/gpu": 3, "cpu": 10}, "root"), Association("acc", "alice", {})]
    assert parse_tres("") == {} and parse_tres("billing=5,bad=x") == {"billing": 5}


def test_slurmrestd_bodies_and_tres_lists() -> None:
    from adapters.slurm_rest.accounting import RestAccountingManager, tres_from_list, tres_to_list
    from adapters.slurm_rest.layers import LAYERS

    assert tres_to_list({"gres/gpu": 3, "cpu": 10}) == [{"type": "cpu", "name": "", "count": 10},
                                                        {"type": "gres", "name": "gpu", "count": 3}]
    assert tres_from_list(tres_to_list({"gres/gpu": 3, "billing": 7})) == {"gres/gpu": 3, "billing": 7}
    assert tres_from_list([{"type": "gres", "name": "gpu", "id": 1001, "count": 3}, {"bad": 1}, "x"]) == \
        {"gres/gpu": 3}
    layer = LAYERS["v0.0.42"]()
    reqs = RestAccountingManager.requests_for(layer, AccountingChange("add_account", "acc",
                                                                      grp_tres_mins={"gres/gpu": 6}), "dev")
    assert [(m, p) for m, p, _, _ in reqs] == [("POST", "/slurmdb/v0.0.42/accounts_association/"),
                                               ("POST", "/slurmdb/v0.0.42/associations/")]
    assert reqs[1][3] == {"associations": [{"account": "acc", "cluster": "dev", "user": "", "max": {
        "tres": {"group": {"minutes": [{"type": "gres", "name": "gpu", "count": 6}]}}}}]}
    gone = RestAccountingManager.requests_for(layer, AccountingChange("remove_association", "acc", user="bob"), "dev")
    assert gone == [("DELETE", "/slurmdb/v0.0.42/association/", {"account": "acc", "user": "bob", "cluster": "dev"},
                     None)]
    with pytest.raises(ValueError):
        RestAccountingManager.requests_for(layer, AccountingChange("add_association", "acc", user="a&b=c"), "dev")
