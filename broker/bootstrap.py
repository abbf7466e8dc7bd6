"""Start-up work shared by ``serve``, the CLI and tests: engine, schema, local cluster."""

from __future__ import annotations

import logging

from sqlalchemy.engine import Engine
from sqlmodel import select

from broker.config import Settings
from broker.db import get_engine, session_scope
from broker.migrate import upgrade
from broker.models import Cluster

log = logging.getLogger(__name__)

LOCAL_CLUSTER = "local"


def engine_for(settings: Settings, *, migrate: bool | None = None) -> Engine:
    """The settings' engine; the schema is brought up to date unless ``migrate`` (default:
    the ``migrate_on_start`` setting) is false — then a migration job does it and
    ``/readyz`` stays 503 until the schema is current."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = get_engine(settings.effective_database_url, pool_size=settings.pool_size,
                        pool_timeout=settings.database_pool_timeout_seconds)
    if settings.migrate_on_start if migrate is None else migrate:
        upgrade(engine)
    return engine


def ensure_local_cluster(engine: Engine, settings: Settings) -> None:
    """Register the ``local`` cluster (embedded default) if it is missing."""
    if not settings.register_local_cluster or settings.mode != "embedded":
        return
    with session_scope(engine) as session:
        if session.exec(select(Cluster).where(Cluster.name == LOCAL_CLUSTER)).first():
            return
        session.add(Cluster(
            name=LOCAL_CLUSTER, adapter="local",
            description="Runs jobs as subprocesses of the broker's own OS user — development and demos only.",
            connection={"partitions": [
                {"name": "cpu", "cpus": 8, "gpus": 0, "memory_mb": 16384, "default": True},
                {"name": "gpu", "cpus": 8, "gpus": 4, "memory_mb": 16384},
            ]},
            default_partition="cpu", poll_interval_seconds=settings.local_cluster_poll_seconds,
            partitions=[
                {"name": "cpu", "default": True, "nodes": 1, "cpus_per_node": 8, "gpus_per_node": 0,
                 "memory_per_node_mb": 16384, "max_time_minutes": None, "tres": {}},
                {"name": "gpu", "default": False, "nodes": 1, "cpus_per_node": 8, "gpus_per_node": 4,
                 "memory_per_node_mb": 16384, "max_time_minutes": None, "tres": {}},
            ],
            health_ok=True, health_detail="embedded local cluster",
        ))
        log.info("registered the embedded 'local' cluster (dev only)")
