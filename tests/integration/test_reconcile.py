"""A crash between "submitted to the cluster" and "recorded": the tracker adopts the
job by its tag (exactly once); a job that never reached the cluster is released."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from broker.db import session_scope
from broker.services import ledger
from broker.services.clusters import adapter_for
from tests.support.env import BrokerEnv
from tests.support.jobs import crash_after_submit


def test_job_on_cluster_but_not_recorded_is_adopted_once(env: BrokerEnv) -> None:
    env.setup_project()
    alice = env.auth("alice")
    job_id = crash_after_submit(env, "sleep 1", reach_cluster=True)
    assert env.job(job_id, alice)["state"] == "ACCEPTED"
    done = env.wait_settled(job_id, alice, timeout=30)
    assert done["state"] == "COMPLETED" and done["scheduler_job_id"]
    with env.engine.connect() as conn:
        kinds = sorted(k for (k,) in conn.execute(sa.text("SELECT kind FROM ledger_entries WHERE job_id=:j"),
                                                  {"j": job_id}))
    assert kinds == ["charge", "release", "reserve"]
    # nothing was submitted twice: the local cluster holds exactly one job with this tag
    found = adapter_for(env.app.state.registry, _cluster(env)).find_by_tag([job_id])
    assert list(found) == [job_id]


def test_job_that_never_reached_the_cluster_is_released_not_resubmitted(env: BrokerEnv) -> None:
    env.setup_project()
    alice = env.auth("alice")
    job_id = crash_after_submit(env, "sleep 1", reach_cluster=False)
    done = env.wait_settled(job_id, alice, timeout=30)
    assert done["state"] == "SUBMIT_FAILED" and done["charged"]["amount"] == 0
    assert done["scheduler_job_id"] is None
    time.sleep(1)
    assert adapter_for(env.app.state.registry, _cluster(env)).find_by_tag([job_id]) == {}
    with session_scope(env.engine) as s:
        assert ledger.check(s) == []


@pytest.mark.parametrize("forged", [{"username": "mallory"}, {"account": "proj-other"}],
                         ids=["other-user", "other-account"])
def test_tagged_job_that_is_not_the_recorded_intent_is_not_adopted(env: BrokerEnv, forged: dict) -> None:
    """Adoption checks the tag AND the intent written before the scheduler call (user,
    account, submit-time window): a job carrying the tag but run by someone else or on
    another account is not the broker's job (issue 10: import keyed on facts)."""
    env.setup_project()
    alice = env.auth("alice")
    job_id = crash_after_submit(env, "sleep 1", reach_cluster=True, **forged)
    done = env.wait_settled(job_id, alice, timeout=30)
    assert done["state"] == "SUBMIT_FAILED" and done["scheduler_job_id"] is None
    assert done["charged"]["amount"] == 0


def _cluster(env: BrokerEnv):  # type: ignore[no-untyped-def]
    from sqlmodel import select

    from broker.models import Cluster

    with session_scope(env.engine) as s:
        return s.exec(select(Cluster).where(Cluster.name == "local")).one()


def test_adoption_checks_the_submit_time_window(env: BrokerEnv) -> None:
    """A tagged job submitted long before the intent was written (or long after it
    could have been submitted) is not this broker job."""
    from datetime import timedelta

    from broker.adapter import SchedulerJobRef
    from broker.models import Job

    env.setup_project()
    env.app.state.tracker.stop()
    job_id = crash_after_submit(env, "sleep 1", reach_cluster=False)
    with session_scope(env.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
    tracker = env.app.state.tracker
    cluster = _cluster(env)

    def ref(**over: object) -> SchedulerJobRef:
        base = {"job_id": "424242", "username": job.username, "tag": job.id, "account": job.account,
                "submit_time": job.created_at + timedelta(seconds=1)}
        return SchedulerJobRef(**{**base, **over})  # type: ignore[arg-type]

    assert tracker._matches_intent(cluster, job, ref())
    assert tracker._matches_intent(cluster, job, ref(submit_time=None, account=None))  # adapter cannot tell
    assert not tracker._matches_intent(cluster, job, ref(submit_time=job.created_at - timedelta(hours=2)))
    assert not tracker._matches_intent(cluster, job, ref(submit_time=job.created_at + timedelta(days=1)))
    assert not tracker._matches_intent(cluster, job, ref(username="mallory"))
    assert not tracker._matches_intent(cluster, job, ref(account="proj-other"))
    # Slurm folds account names: the account in another case is the intended one
    assert tracker._matches_intent(cluster, job, ref(account=job.account.upper()))


def _backdate(env: BrokerEnv, ages: dict[str, float]) -> datetime:
    """Each job of ``ages`` made that many seconds older than the reconciler's grace
    (so a cycle looks it up); the oldest one's new creation time."""
    from broker.models import Job

    with session_scope(env.engine) as s:
        created = []
        for job_id, age in ages.items():
            job = s.get(Job, job_id)
            assert job is not None
            job.created_at = job.created_at - timedelta(seconds=env.settings.reconcile_grace_seconds + age)
            created.append(job.created_at)
        return min(created)


def _reconcile_recording(env: BrokerEnv, lookup: Callable[..., Any]) -> None:
    """One reconciliation of the local cluster with the adapter's find_by_tag replaced
    by ``lookup(real_find_by_tag)``."""
    cluster = _cluster(env)
    adapter = adapter_for(env.app.state.registry, cluster)
    adapter.find_by_tag = lookup(adapter.find_by_tag)  # type: ignore[method-assign]
    try:
        env.app.state.tracker.reconcile_cluster(cluster, adapter)
    finally:
        del adapter.find_by_tag


def _adopted(env: BrokerEnv, job_id: str) -> bool:
    from broker.models import Job

    with session_scope(env.engine) as s:
        job = s.get(Job, job_id)
        return job is not None and job.scheduler_job_id is not None


def test_reconciliation_reads_accounting_only_from_the_oldest_intent(env: BrokerEnv) -> None:
    """find_by_tag is asked from the oldest waiting intent minus the adoption clock skew
    (nothing earlier could be adopted), not an hour before it, and for the waiting jobs'
    accounts only: on a busy cluster each extra minute, and each other account, is
    thousands of accounting records to read. The job is still adopted."""
    from broker.tracker import ADOPT_CLOCK_SKEW

    env.setup_project()
    env.app.state.tracker.stop()
    job_id = crash_after_submit(env, "sleep 1", reach_cluster=True)
    older = crash_after_submit(env, "sleep 1", reach_cluster=False)
    oldest = _backdate(env, {job_id: 5, older: 25})
    asked: list[object] = []

    def recording(real):  # type: ignore[no-untyped-def]
        def find_by_tag(tags, *, since=None, accounts=None):  # type: ignore[no-untyped-def]
            asked.append((sorted(tags), since, accounts))
            return real(tags, since=since, accounts=accounts)
        return find_by_tag

    _reconcile_recording(env, recording)
    # and only the accounts of the waiting jobs (lower case, as Slurm stores them)
    assert asked == [(sorted([job_id, older]), oldest - ADOPT_CLOCK_SKEW, ["proj-a"])]
    assert _adopted(env, job_id)


def test_a_plugin_without_the_accounts_parameter_is_asked_without_it(env: BrokerEnv) -> None:
    """find_by_tag's ``accounts`` came later: an adapter written before it is asked
    as before (told from its signature), and the job is still adopted."""
    from broker.adapter import find_by_tag_accepts_accounts

    env.setup_project()
    env.app.state.tracker.stop()
    job_id = crash_after_submit(env, "sleep 1", reach_cluster=True)
    _backdate(env, {job_id: 5})
    assert find_by_tag_accepts_accounts(adapter_for(env.app.state.registry, _cluster(env)))
    asked: list[list[str]] = []

    def older(real):  # type: ignore[no-untyped-def]
        def find_by_tag(tags, *, since=None):  # type: ignore[no-untyped-def]
            asked.append(sorted(tags))
            return real(tags, since=since)
        assert not find_by_tag_accepts_accounts(type("Older", (), {"find_by_tag": staticmethod(find_by_tag)})())
        return find_by_tag

    _reconcile_recording(env, older)
    assert asked == [[job_id]]
    assert _adopted(env, job_id)
