"""The FastAPI application: routers, problem+json, metrics, health, tracker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.engine import Engine

from broker import dashboard
from broker.api import docs, openapi, problems
from broker.api.middleware import BodyLimit, UrlCheck
from broker.api.routers import clusters, enforcement, events, jobs, projects, reports
from broker.auth import Authenticator
from broker.bootstrap import engine_for, ensure_local_cluster
from broker.config import Settings, get_settings
from broker.metrics import DatabaseCollector, process_registry
from broker.migrate import is_up_to_date
from broker.ratelimit import make_rate_limiter
from broker.registry import AdapterRegistry
from broker.tracker import Tracker
from broker.webhooks import Notifier

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, engine: Engine | None = None,
               run_tracker: bool | None = None) -> FastAPI:
    """Build the app. ``run_tracker`` defaults to the settings' ``run_tracker``."""
    settings = settings or get_settings()
    engine = engine or engine_for(settings)
    ensure_local_cluster(engine, settings)
    registry = AdapterRegistry(settings)
    tracker = Tracker(engine, settings, registry)
    notifier = Notifier(engine, settings)
    start_tracker = settings.run_tracker if run_tracker is None else run_tracker

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_tracker:
            tracker.start()
            notifier.start()
        try:
            yield
        finally:
            tracker.stop()
            notifier.stop()
            registry.close()
            if getattr(app.state, "event_hub", None) is not None:
                app.state.event_hub.close()

    app = FastAPI(title="aifa-broker", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Compute-access broker for EuroHPC AI Factory allocations.")
    app.state.settings, app.state.engine, app.state.registry = settings, engine, registry
    app.state.tracker, app.state.provisioned = tracker, set()
    app.state.notifier = notifier
    app.state.authenticator = Authenticator(settings)
    app.state.rate_limiter = make_rate_limiter(settings.rate_limit_per_minute,
                                                settings.rate_limit_storage_url)
    db_metrics = CollectorRegistry(auto_describe=False)
    db_metrics.register(DatabaseCollector(engine))
    problems.install(app)
    # events first: its long-poll route takes GET /v1/jobs/{id} only when ?wait_for= is given
    for router in (events.router, jobs.router, projects.router, clusters.router, enforcement.router,
                   reports.router):
        app.include_router(router)
    dashboard.install(app, settings)
    docs.install(app)
    openapi.install(app)
    _add_probes(app, engine, db_metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(UrlCheck)
    return app


def _add_probes(app: FastAPI, engine: Engine, db_metrics: CollectorRegistry) -> None:
    @app.get("/healthz", tags=["probes"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    def readyz() -> JSONResponse:
        """Readiness: the database answers and its schema is current."""
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            current = is_up_to_date(engine)
        except sa.exc.SQLAlchemyError:
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
        if not current:
            return JSONResponse({"status": "unavailable", "database": "schema not current: run "
                                 "`aifa-broker db upgrade`"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["probes"])
    def metrics(_: Request) -> Response:
        """Prometheus exposition: counters (summed over every process of a multi-worker
        broker) + values read from the database."""
        return Response(generate_latest(process_registry()) + generate_latest(db_metrics),
                        media_type=CONTENT_TYPE_LATEST)
