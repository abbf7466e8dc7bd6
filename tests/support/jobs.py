"""Live jobs written straight into the database (as the submit path leaves them),
for tests and benchmarks of the tracker's side: no scheduler, no API."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy.engine import Engine
from sqlmodel import select

from broker.db import session_scope
from broker.models import Allocation, Cluster, Job, User
from broker.services import ledger


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
