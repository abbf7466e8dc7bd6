"""B3's baseline: a bare FastAPI endpoint doing one PostgreSQL query, served like the broker.

``python -m bench.bare --port P --workers N`` with ``AIFA_BROKER_DATABASE_URL`` set.
Same uvicorn, same worker count, same sync-endpoint thread pool, same pool size.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI

from broker.server import NoDelayHTTPProtocol, serve_workers


def make_app() -> FastAPI:
    engine = sa.create_engine(os.environ["AIFA_BROKER_DATABASE_URL"], pool_size=10, max_overflow=10,
                              pool_pre_ping=True)
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/bare")
    def bare(body: dict[str, Any]) -> dict[str, Any]:
        with engine.connect() as conn:
            value = conn.execute(sa.text("SELECT 1")).scalar_one()
        return {"ok": value, "project": body.get("project")}

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    # the broker's own way of serving (broker/server.py): same processes, sockets, protocol
    if args.workers > 1:
        serve_workers("bench.bare:make_app", host="127.0.0.1", port=args.port, workers=args.workers,
                      log_level="warning")
    else:
        uvicorn.run(make_app(), host="127.0.0.1", port=args.port, log_level="warning", http=NoDelayHTTPProtocol)


if __name__ == "__main__":
    main()
