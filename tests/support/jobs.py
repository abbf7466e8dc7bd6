"""Live jobs written straight into the database (as the submit path leaves them),
for tests and benchmarks of the tracker's side: no scheduler, no API."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine
from sqlmodel import select

from broker.db import session_scope
from broker.models import Allocation, Cluster, Job, User
from broker.services import ledger

if TYPE_CHECKING:
    from tests.support.env import BrokerEnv


def seed_live_jobs(engine: Engine, n: int, *, state: str, partition: str, unit: str, reserved: int,
                   first_scheduler_id: int = 100000, submitted_at: datetime | None = None) -> list[str]:
    """``n`` jobs of alice on the local cluster's one allocation, each in ``state``
    with scheduler id ``first_scheduler_id + i`` and its reservation of ``reserved``
    (ledger row and balance); their ids."""
    ids = []
    with session_scope(engine) as s:
        cluster = s.exec(select(Cluster).where(Cluster.name == "local")).one()
        alloc = s.exec(select(Allocation)).one()
        user = s.exec(select(User).where(User.name == "alice")).one()
        for i in range(n):
            job = Job(id=uuid.uuid4().hex, project_id=alloc.project_id, cluster_id=cluster.id, user_id=user.id,
                      allocation_id=alloc.id, name="b", partition=partition, username="alice", account="proj-a",
                      unit=unit, estimated=reserved, reserved=reserved, state=state,
                      scheduler_job_id=str(first_scheduler_id + i), submitted_at=submitted_at or datetime.now(UTC))
            s.add(job)
            s.flush()
            ledger.reserve(s, allocation=alloc, amount=reserved, job_id=job.id, user_id=user.id, actor="test")
            ids.append(job.id)
    return ids


def crash_after_submit(env: BrokerEnv, script: str, *, reach_cluster: bool, project: str = "EHPC-TEST-001",
                       user: str = "alice", **forged: str) -> str:
    """Do what the submit path does up to the adapter call, then 'die' (the broker job
    stays ACCEPTED, its scheduler id never recorded); the job's id. ``forged`` replaces
    fields of what reaches the cluster (someone else's job with the tag)."""
    from broker.auth import Authenticator
    from broker.schemas import JobRequest
    from broker.services.clusters import adapter_for
    from broker.services.jobs import _reserve

    principal = Authenticator(env.settings).authenticate(env.token(user))
    body = JobRequest(project=project, script=script, time_limit_minutes=5)
    job, spec, cluster = _reserve(env.engine, env.settings, principal, body, None)
    if reach_cluster:
        adapter_for(env.app.state.registry, cluster).submit(replace(spec, **forged))
    return job.id
