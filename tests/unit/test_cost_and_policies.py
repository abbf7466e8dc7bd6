"""Cost model and built-in eligibility policies, table-driven (no database)."""

from __future__ import annotations

from datetime import date

import pytest

from broker.config import DEFAULT_ELIGIBILITY_CHAIN
from broker.cost import CostModelError, cost_micro, request_tres, validate_cost_model
from broker.policy import AccessModeLimits, AllocationView, EligibilityContext, JobRequestView, ProjectView
from policies.eligibility import (
    AllocationValid,
    ClusterAccount,
    ConcurrencyLimits,
    JobLimits,
    PartitionAllowed,
    ProjectActive,
)

TRES = request_tres(nodes=2, ntasks_per_node=4, cpus_per_task=2, gpus_per_node=4, memory_per_node_mb=1000)
GPU_MODEL = {"partitions": {"gpu": {"billing_hours": {"cpu": 0.5, "gres/gpu": 10}}}}


@pytest.mark.parametrize(("model", "partition", "unit", "seconds", "expected"), [
    ({}, "gpu", "gpu_hours", 3600, 8.0),
    ({}, "gpu", "node_hours", 1800, 1.0),
    ({}, "gpu", "core_hours", 3600, 16.0),
    ({}, "gpu", "billing_hours", 3600, 16.0),  # billing falls back to cpus
    (GPU_MODEL, "gpu", "billing_hours", 3600, 16 * 0.5 + 8 * 10),
    (GPU_MODEL, "cpu", "billing_hours", 3600, 16.0),  # other partition: default weights
    ({}, "gpu", "gpu_hours", 0, 0.0),
    ({}, "gpu", "gpu_hours", 1, 8 / 3600),
])
def test_cost(model: dict, partition: str, unit: str, seconds: int, expected: float) -> None:
    got = cost_micro(model, partition=partition, unit=unit, tres=TRES, seconds=seconds) / 1e6
    assert got == pytest.approx(expected, abs=1e-6)
    assert got >= expected - 1e-9  # rounding never undershoots


@pytest.mark.parametrize("model", [
    {"x": 1}, {"partitions": []}, {"partitions": {"gpu": {"euros": {}}}},
    {"partitions": {"gpu": {"gpu_hours": {"gres/gpu": -1}}}}, {"partitions": {"gpu": {"gpu_hours": "1"}}},
])
def test_bad_cost_models(model: dict) -> None:
    with pytest.raises(CostModelError):
        validate_cost_model(model)


def ctx(**over: object) -> EligibilityContext:
    base: dict = dict(
        today=date(2026, 6, 1), user="alice",
        project=ProjectView("P", "active", "playground", date(2026, 1, 1), date(2026, 12, 31)),
        allocation=AllocationView(1, "c", "gpu_hours", 10, 0, 0, None, None, "acct"),
        allocations_on_cluster_exist=True, cluster_account="alice",
        request=JobRequestView("c", "gpu", 1, 1, 1, 2, None, 60), limits=AccessModeLimits(),
        active_jobs_user=0, active_jobs_project=0)
    base.update(over)
    return EligibilityContext(**base)


@pytest.mark.parametrize(("policy", "over", "code"), [
    (ProjectActive(), {}, None),
    (ProjectActive(), {"project": ProjectView("P", "suspended", "m", None, None)}, "project_inactive"),
    (ProjectActive(), {"today": date(2025, 12, 31)}, "project_inactive"),
    (ProjectActive(), {"today": date(2027, 1, 1)}, "project_inactive"),
    (AllocationValid(), {}, None),
    (AllocationValid(), {"allocation": None, "allocations_on_cluster_exist": False}, "no_allocation"),
    (AllocationValid(), {"allocation": None}, "allocation_expired"),
    (AllocationValid(), {"allocation": AllocationView(1, "c", "u", 1, 0, 0, None, date(2026, 5, 1), "a")},
     "allocation_expired"),
    (ClusterAccount(), {}, None),
    (ClusterAccount(), {"cluster_account": None}, "no_cluster_account"),
    (PartitionAllowed(), {}, None),
    (PartitionAllowed(), {"limits": AccessModeLimits(allowed_partitions=("cpu",))}, "partition_not_allowed"),
    (JobLimits(), {"limits": AccessModeLimits(max_gpus_per_job=2)}, None),
    (JobLimits(), {"limits": AccessModeLimits(max_gpus_per_job=1)}, "limit_exceeded"),
    (JobLimits(), {"limits": AccessModeLimits(max_time_minutes=59)}, "limit_exceeded"),
    (JobLimits(), {"limits": AccessModeLimits(max_nodes=0)}, "limit_exceeded"),
    (ConcurrencyLimits(), {"limits": AccessModeLimits(max_concurrent_jobs_per_user=1), "active_jobs_user": 1},
     "limit_exceeded"),
    (ConcurrencyLimits(), {"limits": AccessModeLimits(max_concurrent_jobs_per_project=3),
                           "active_jobs_project": 2}, None),
    (ConcurrencyLimits(), {"limits": AccessModeLimits(max_concurrent_jobs_per_user=1), "active_jobs_user": 0},
     None),
    # an array of N tasks counts N, as Slurm's MaxJobs/MaxSubmitJobs: active + N may not exceed the limit
    (ConcurrencyLimits(), {"limits": AccessModeLimits(max_concurrent_jobs_per_user=4), "active_jobs_user": 2,
                           "request": JobRequestView("c", "gpu", 1, 1, 1, 2, None, 60, array_tasks=2)}, None),
    (ConcurrencyLimits(), {"limits": AccessModeLimits(max_concurrent_jobs_per_user=4), "active_jobs_user": 3,
                           "request": JobRequestView("c", "gpu", 1, 1, 1, 2, None, 60, array_tasks=2)},
     "limit_exceeded"),
    (ConcurrencyLimits(), {"limits": AccessModeLimits(max_concurrent_jobs_per_project=3),
                           "request": JobRequestView("c", "gpu", 1, 1, 1, 2, None, 60, array_tasks=4)},
     "limit_exceeded"),
])
def test_policy(policy: object, over: dict, code: str | None) -> None:
    denial = policy.check(ctx(**over))  # type: ignore[attr-defined]
    assert (denial.code if denial else None) == code
    if denial:
        assert denial.detail.endswith(".") and len(denial.detail) > 20


class _SitePolicy:
    """A third-party policy that says nothing about the active-job counts."""

    name = "site"

    def check(self, ctx: EligibilityContext) -> None:
        return None


@pytest.mark.parametrize(("limits", "extra", "counted"), [
    (AccessModeLimits(), [], False),  # the default: nothing reads them, nothing is counted
    (AccessModeLimits(max_nodes=2, max_time_minutes=60), [], False),
    (AccessModeLimits(max_concurrent_jobs_per_user=3), [], True),
    (AccessModeLimits(max_concurrent_jobs_per_project=30), [], True),
    (AccessModeLimits(), [_SitePolicy()], True),  # a policy that does not say is given them
])
def test_active_jobs_are_counted_only_for_a_policy_that_reads_them(
        limits: AccessModeLimits, extra: list[object], counted: bool) -> None:
    from broker.services.eligibility import load_chain, reads_active_jobs

    chain = [*load_chain(list(DEFAULT_ELIGIBILITY_CHAIN)), *extra]
    assert reads_active_jobs(chain, limits) is counted  # type: ignore[arg-type]


def test_a_limit_without_counts_is_an_error_not_an_allow() -> None:
    with pytest.raises(RuntimeError, match="not counted"):
        ConcurrencyLimits().check(ctx(limits=AccessModeLimits(max_concurrent_jobs_per_user=1), active_jobs_user=None))


def test_plugins_are_found_by_name_and_import_failures_are_deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker import plugins

    assert {"local", "slurm_ssh", "slurm_rest", "pyslurm"} <= set(plugins.available(plugins.ADAPTER_GROUP))
    assert plugins.load_policy_class("project_active") is ProjectActive
    with pytest.raises(plugins.PluginNotFound):
        plugins.load_adapter_class("no-such-adapter")
