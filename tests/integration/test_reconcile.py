"""A crash between "submitted to the cluster" and "recorded": the tracker adopts the
job by its tag (exactly once); a job that never reached the cluster is released."""

from __future__ import annotations

import time

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


def test_reconciliation_reads_accounting_only_from_the_oldest_intent(env: BrokerEnv) -> None:
    """find_by_tag is asked from the oldest waiting intent minus the adoption clock skew
    (nothing earlier could be adopted), not an hour before it, and for the waiting jobs'
    accounts only: on a busy cluster each extra minute, and each other account, is
    thousands of accounting records to read. The job is still adopted."""
    from datetime import timedelta

    from broker.models import Job
    from broker.tracker import ADOPT_CLOCK_SKEW

    env.setup_project()
    env.app.state.tracker.stop()
    job_id = crash_after_submit(env, "sleep 1", reach_cluster=True)
    older = crash_after_submit(env, "sleep 1", reach_cluster=False)
    backdate = timedelta(seconds=env.settings.reconcile_grace_seconds + 5)
    with session_scope(env.engine) as s:
        for jid, age in ((job_id, backdate), (older, backdate + timedelta(seconds=20))):
            job = s.get(Job, jid)
            assert job is not None
            job.created_at = job.created_at - age
        s.flush()
        oldest = min(j.created_at for j in (s.get(Job, job_id), s.get(Job, older)) if j is not None)
    cluster = _cluster(env)
    adapter = adapter_for(env.app.state.registry, cluster)
    asked: list[object] = []
    real = adapter.find_by_tag

    def recording(tags, *, since=None, accounts=None):  # type: ignore[no-untyped-def]
        asked.append((sorted(tags), since, accounts))
        return real(tags, since=since, accounts=accounts)

    adapter.find_by_tag = recording  # type: ignore[method-assign]
    try:
        env.app.state.tracker.reconcile_cluster(cluster, adapter)
    finally:
        del adapter.find_by_tag
    # and only the accounts of the waiting jobs (lower case, as Slurm stores them)
    assert asked == [(sorted([job_id, older]), oldest - ADOPT_CLOCK_SKEW, ["proj-a"])]
    with session_scope(env.engine) as s:
        adopted = s.get(Job, job_id)
        assert adopted is not None and adopted.scheduler_job_id is not None


def test_a_plugin_without_the_accounts_parameter_is_asked_without_it(env: BrokerEnv) -> None:
    """find_by_tag's ``accounts`` came later: an adapter written before it is asked
    as before (told from its signature), and the job is still adopted."""
    from datetime import timedelta

    from broker.adapter import find_by_tag_accepts_accounts
    from broker.models import Job

    env.setup_project()
    env.app.state.tracker.stop()
    job_id = crash_after_submit(env, "sleep 1", reach_cluster=True)
    with session_scope(env.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.created_at = job.created_at - timedelta(seconds=env.settings.reconcile_grace_seconds + 5)
    cluster = _cluster(env)
    adapter = adapter_for(env.app.state.registry, cluster)
    assert find_by_tag_accepts_accounts(adapter)
    real = adapter.find_by_tag
    asked: list[list[str]] = []

    def older(tags, *, since=None):  # type: ignore[no-untyped-def]
        asked.append(sorted(tags))
        return real(tags, since=since)

    adapter.find_by_tag = older  # type: ignore[method-assign]
    try:
        assert not find_by_tag_accepts_accounts(adapter)
        env.app.state.tracker.reconcile_cluster(cluster, adapter)
    finally:
        del adapter.find_by_tag
    assert asked == [[job_id]]
    with session_scope(env.engine) as s:
        adopted = s.get(Job, job_id)
        assert adopted is not None and adopted.scheduler_job_id is not None
