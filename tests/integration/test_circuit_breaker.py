"""Submitting to a cluster that does not answer fails fast (issue 9: it waited ~2 min):
a per-cluster circuit breaker fed by the tracker's health verdict and by submissions
that could not connect answers 503 ``cluster_unavailable`` with ``Retry-After`` at
once, reserves nothing, and closes after the tracker's next successful probe."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from broker.adapter import ClusterUnreachable, JobSpec, SchedulerJobRef
from broker.models import utcnow
from broker.services.clusters import adapter_for
from tests.support.env import BrokerEnv

JOB = {"project": "EHPC-TEST-001", "script": "true", "time_limit_minutes": 1}


def _jobs_and_reserved(env: BrokerEnv) -> tuple[int, int]:
    with env.engine.connect() as conn:
        return (conn.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar_one(),
                conn.execute(sa.text("SELECT SUM(reserved) FROM allocations")).scalar_one())


def _local(env: BrokerEnv) -> Any:
    from sqlmodel import Session, select

    from broker.models import Cluster

    with Session(env.engine) as s:
        return s.exec(select(Cluster).where(Cluster.name == "local")).one()


def test_a_cluster_reported_down_is_refused_at_once(env: BrokerEnv) -> None:
    env.setup_project()
    env.app.state.tracker.stop()  # the test sets the verdict itself
    with env.engine.begin() as conn:
        conn.execute(sa.text("UPDATE clusters SET unreachable_since = :t, health_ok = :f, health_checked_at = :t, "
                             "health_detail = 'cannot reach 127.0.0.1:2222' WHERE name = 'local'"),
                     {"t": utcnow().replace(tzinfo=None), "f": False})
    t0 = time.monotonic()
    r = env.call("POST", "/v1/jobs", env.auth("alice"), json=JOB)
    assert time.monotonic() - t0 < 2
    assert r.status_code == 503 and r.json()["code"] == "cluster_unavailable", r.text
    assert int(r.headers["Retry-After"]) > 0 and "does not answer" in r.json()["detail"]
    assert _jobs_and_reserved(env) == (0, 0)
    # a stale verdict (no tracker refreshed it for long) no longer blocks: the cluster is tried
    with env.engine.begin() as conn:
        conn.execute(sa.text("UPDATE clusters SET health_checked_at = :t WHERE name = 'local'"),
                     {"t": (utcnow() - timedelta(hours=1)).replace(tzinfo=None)})
    assert env.call("POST", "/v1/jobs", env.auth("alice"), json=JOB).status_code == 201


def test_a_submission_that_cannot_connect_opens_the_breaker_and_a_probe_closes_it(env: BrokerEnv) -> None:
    env.setup_project()
    tracker = env.app.state.tracker
    tracker.stop()
    adapter = adapter_for(env.app.state.registry, _local(env))
    calls: list[str] = []
    real_submit = adapter.submit

    def unreachable(spec: JobSpec) -> SchedulerJobRef:
        calls.append(spec.tag)
        raise ClusterUnreachable("cannot connect to 127.0.0.1:2222: connection refused")

    adapter.submit = unreachable  # type: ignore[method-assign]
    first = env.call("POST", "/v1/jobs", env.auth("alice"), json=JOB)
    assert first.status_code == 503 and first.json()["code"] == "cluster_unavailable"
    second = env.call("POST", "/v1/jobs", env.auth("alice"), json=JOB)
    assert second.status_code == 503 and "Retry-After" in second.headers
    assert len(calls) == 1  # the second never tried to connect
    assert _jobs_and_reserved(env) == (1, 0)  # the first is SUBMIT_FAILED, its reservation released
    adapter.submit = real_submit  # type: ignore[method-assign]
    tracker.run_cycle(force=True)  # the tracker probes the idle cluster marked down: it answers
    assert env.call("POST", "/v1/jobs", env.auth("alice"), json=JOB).status_code == 201
