"""Built-in eligibility policies, registered under ``aifa_broker.policies``.

Each returns ``None`` (allow) or a :class:`~broker.policy.Denial` with a stable code
and a sentence. The chain order is set in the settings (``eligibility_chain``);
membership is checked by the core before any policy runs (non-members get 404).
"""

from __future__ import annotations

from broker.policy import AccessModeLimits, Denial, EligibilityContext


class ProjectActive:
    """The project is active and today lies inside its dates."""

    name = "project_active"
    reads_active_jobs = False

    def check(self, ctx: EligibilityContext) -> Denial | None:
        p = ctx.project
        if p.status != "active":
            return Denial("project_inactive", f"Project {p.code} is {p.status}, not active.")
        if p.start_date and ctx.today < p.start_date:
            return Denial("project_inactive", f"Project {p.code} starts on {p.start_date}.")
        if p.end_date and ctx.today > p.end_date:
            return Denial("project_inactive", f"Project {p.code} ended on {p.end_date}.")
        return None


class AllocationValid:
    """An allocation exists for the cluster and is inside its validity window."""

    name = "allocation_valid"
    reads_active_jobs = False

    def check(self, ctx: EligibilityContext) -> Denial | None:
        a = ctx.allocation
        cluster = ctx.request.cluster
        if a is None:
            if ctx.allocations_on_cluster_exist:
                return Denial("allocation_expired",
                              f"The allocation of {ctx.project.code} on {cluster} is not valid today.")
            return Denial("no_allocation", f"Project {ctx.project.code} has no allocation on {cluster}.")
        if (a.start_date and ctx.today < a.start_date) or (a.end_date and ctx.today > a.end_date):
            return Denial("allocation_expired",
                          f"The allocation on {cluster} is valid {a.start_date} to {a.end_date}.")
        return None


class ClusterAccount:
    """The user has a POSIX account mapped on the cluster."""

    name = "cluster_account"
    reads_active_jobs = False

    def check(self, ctx: EligibilityContext) -> Denial | None:
        if not ctx.cluster_account:
            return Denial("no_cluster_account",
                          f"User {ctx.user} has no account on cluster {ctx.request.cluster}; "
                          "ask a sysadmin to map one.")
        return None


class PartitionAllowed:
    """The partition is allowed for the project's access mode."""

    name = "partition_allowed"
    reads_active_jobs = False

    def check(self, ctx: EligibilityContext) -> Denial | None:
        allowed = ctx.limits.allowed_partitions
        if allowed is not None and ctx.request.partition not in allowed:
            return Denial("partition_not_allowed",
                          f"Partition {ctx.request.partition} is not open to access mode "
                          f"{ctx.project.access_mode} (allowed: {', '.join(allowed) or 'none'}).")
        return None


class JobLimits:
    """Per-job limits of the access mode: nodes, GPUs, time."""

    name = "job_limits"
    reads_active_jobs = False

    def check(self, ctx: EligibilityContext) -> Denial | None:
        lim, req = ctx.limits, ctx.request
        gpus = req.nodes * req.gpus_per_node
        checks = (
            (lim.max_nodes, req.nodes, "nodes"),
            (lim.max_gpus_per_job, gpus, "GPUs"),
            (lim.max_time_minutes, req.time_limit_minutes, "minutes of time limit"),
        )
        for limit, asked, what in checks:
            if limit is not None and asked > limit:
                return Denial("limit_exceeded",
                              f"The job asks for {asked} {what}; access mode "
                              f"{ctx.project.access_mode} allows at most {limit}.")
        return None


class ConcurrencyLimits:
    """At most N active jobs per user and per project, counted as Slurm's own
    ``MaxJobs``/``MaxSubmitJobs`` count them: each array task that has not ended is
    one job (``ctx.active_jobs_*`` already count so), and a submission of N tasks
    is refused when the active count plus N would exceed the limit (a plain job:
    N = 1, refused when the count has reached the limit)."""

    name = "concurrency_limits"

    def reads_active_jobs(self, limits: AccessModeLimits) -> bool:
        """Only under a concurrency limit (counting is not free: see broker/policy.py)."""
        return limits.max_concurrent_jobs_per_user is not None or limits.max_concurrent_jobs_per_project is not None

    def check(self, ctx: EligibilityContext) -> Denial | None:
        lim, adds = ctx.limits, ctx.request.array_tasks
        scopes = (
            (lim.max_concurrent_jobs_per_user, ctx.active_jobs_user,
             "You already have {n} active jobs in this project"),
            (lim.max_concurrent_jobs_per_project, ctx.active_jobs_project,
             f"Project {ctx.project.code} already has {{n}} active jobs"),
        )
        for limit, active, has in scopes:
            if limit is None:
                continue
            if active is None:  # reads_active_jobs says the broker counted them
                raise RuntimeError("concurrency_limits: the active jobs were not counted under a limit")
            if active + adds > limit:
                return Denial("limit_exceeded", f"{has.format(n=active)} (each array task not yet ended counts "
                                                f"as one job, as in Slurm){_adding(adds)}; the limit is {limit}.")
        return None


def _adding(tasks: int) -> str:
    """What the refused submission would add, when it is more than one job."""
    return f" and this array adds {tasks} tasks" if tasks > 1 else ""
