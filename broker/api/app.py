"""The FastAPI application: routers, problem+json, metrics, health, tracker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.engine import Engine

from broker import dashboard
from broker.api import docs, openapi, problems
from broker.api.middleware import Gate
from broker.api.routers import clusters, enforcement, events, jobs, projects, reports
from broker.api.unit_of_work import check_routes
from broker.auth import Authenticator
from broker.bootstrap import engine_for, ensure_local_cluster
from broker.config import PROBE_THREADS, Settings, get_settings
from broker.job_webhooks import JobWebhookSender
from broker.metrics import DatabaseCollector, process_registry
from broker.migrate import is_up_to_date
from broker.ratelimit import make_rate_limiter
from broker.registry import AdapterRegistry
from broker.tracker import Tracker
from broker.webhooks import Notifier

log = logging.getLogger(__name__)
T = TypeVar("T")


def create_app(settings: Settings | None = None, *, engine: Engine | None = None,
               run_tracker: bool | None = None) -> FastAPI:
    """Build the app. ``run_tracker`` defaults to the settings' ``run_tracker``."""
    settings = settings or get_settings()
    engine = engine or engine_for(settings)
    check_pool(engine, settings)
    ensure_local_cluster(engine, settings)
    registry = AdapterRegistry(settings)
    tracker = Tracker(engine, settings, registry)
    notifier = Notifier(engine, settings)
    job_hooks = JobWebhookSender(engine, settings)
    start_tracker = settings.run_tracker if run_tracker is None else run_tracker

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_tracker:
            tracker.start()
            notifier.start()
            job_hooks.start()
        try:
            yield
        finally:
            tracker.stop()
            notifier.stop()
            job_hooks.stop()
            registry.close()
            if getattr(app.state, "event_hub", None) is not None:
                app.state.event_hub.close()

    # FastAPI's OpenTelemetry instrumentation off: the broker exports Prometheus metrics
    # (/metrics) and configures no OpenTelemetry provider, yet FastAPI looks the global
    # providers up on every request (~30,000 instructions of a ~450,000 /healthz)
    app = FastAPI(title="aifa-broker", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
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
    _add_probes(app, engine, db_metrics)
    # events first: its long-poll route takes GET /v1/jobs/{id} only when ?wait_for= is given
    for router in (events.router, jobs.router, projects.router, clusters.router, enforcement.router,
                   reports.router):
        _add_routes(app, router)
    dashboard.install(app, settings)
    docs.install(app)
    openapi.install(app)
    check_routes(app.router.routes)
    # outermost: a request over the limit costs no more than this check
    app.add_middleware(Gate, max_body_bytes=settings.max_body_bytes, limit=settings.requests_in_flight_limit,
                       threads=settings.worker_threads, wait_seconds=settings.admission_wait_seconds,
                       queue=settings.requests_waiting_limit)
    return app


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """``router``'s routes as the app's own, in order. ``include_router`` (FastAPI
    0.165) keeps the router as one lazily combined route, and matching a request
    against each of its routes costs several times a plain route's path match
    (measured: ~18,000 instructions a route, 6 % of a GET of one job). Our routers
    carry their prefix, tags and route class themselves and are included with no
    options, so their routes are the same as the app's: the OpenAPI document is
    identical (tests/integration/test_openapi_contract.py)."""
    app.router.routes.extend(router.routes)


class UnsafeConfiguration(ValueError):
    """A configuration that could deadlock or starve; refused at startup."""


def check_pool(engine: Engine, settings: Settings) -> None:
    """Refuse an engine whose pool is smaller than the threads that may hold a
    connection at once (each holds at most one, so then no checkout ever waits)."""
    pool = engine.pool
    if not isinstance(pool, sa.pool.QueuePool):
        return  # SQLite in memory / NullPool etc.: not a bounded pool
    capacity = pool.size() + max(pool._max_overflow, 0)
    if capacity < settings.database_users:
        raise UnsafeConfiguration(
            f"the database pool holds {capacity} connections but up to {settings.database_users} threads "
            f"may need one at once (worker_threads={settings.worker_threads} + probe and background "
            "threads): requests could wait for connections while holding every worker thread, which can "
            f"deadlock the broker; set database_pool_size to at least {settings.database_users} or lower "
            "worker_threads")


def _add_probes(app: FastAPI, engine: Engine, db_metrics: CollectorRegistry) -> None:
    # /readyz and /metrics read the database on a small thread limiter of their own
    # (counted in the pool size), so they never queue behind API requests
    limiter: list[anyio.CapacityLimiter] = []

    async def in_probe_thread(fn: Callable[[], T]) -> T:
        if not limiter:
            limiter.append(anyio.CapacityLimiter(PROBE_THREADS))
        return await anyio.to_thread.run_sync(fn, limiter=limiter[0])

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (on the event loop: no thread, no database)."""
        return {"status": "ok"}

    def ready() -> JSONResponse:
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

    @app.get("/readyz", tags=["probes"])
    async def readyz() -> JSONResponse:
        """Readiness: the database answers and its schema is current."""
        return await in_probe_thread(ready)

    @app.get("/metrics", tags=["probes"])
    async def metrics(_: Request) -> Response:
        """Prometheus exposition: counters (summed over every process of a multi-worker
        broker) + values read from the database."""
        body = await in_probe_thread(lambda: generate_latest(process_registry()) + generate_latest(db_metrics))
        return Response(body, media_type=CONTENT_TYPE_LATEST)
