"""A crash between "submitted to the cluster" and "recorded": the tracker adopts the
job by its tag (exactly once); a job that never reached the cluster is released."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import sqlalchemy as sa

from broker.db import session_scope
from broker.schemas import JobRequest
from broker.services import ledger
from broker.services.clusters import adapter_for
from broker.services.jobs import _reserve
from tests.support.env import BrokerEnv


def _crash_after_submit(env: BrokerEnv, script: str, *, reach_cluster: bool, **forged: str) -> str:
    """Do what the submit path does up to the adapter call, then 'die'. ``forged``
    replaces fields of what reaches the cluster (someone else's job with the tag)."""
    from broker.auth import Authenticator

    principal = Authenticator(env.settings).authenticate(env.token("alice"))
    body = JobRequest(project="EHPC-TEST-001", script=script, time_limit_minutes=5)
    job, spec, cluster = _reserve(env.engine, env.settings, principal, body, None)
    if reach_cluster:
        adapter_for(env.app.state.registry, cluster).submit(replace(spec, **forged))
    return job.id


def test_job_on_cluster_but_not_recorded_is_adopted_once(env: BrokerEnv) -> None:
    env.setup_project()
    alice = env.auth("alice")
    job_id = _crash_after_submit(env, "sleep 1", reach_cluster=True)
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
    job_id = _crash_after_submit(env, "sleep 1", reach_cluster=False)
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
    job_id = _crash_after_submit(env, "sleep 1", reach_cluster=True, **forged)
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
    job_id = _crash_after_submit(env, "sleep 1", reach_cluster=False)
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
