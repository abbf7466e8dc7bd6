"""SQL statements and commits per request, in process (what each API call costs the database).

    .venv/bin/python -m bench.queries [--db postgresql] [--show submit]

Serves the app with a TestClient (noop adapter, tracker off) and counts the
statements and commits one request of each kind sends after a warm-up;
``--show KIND`` prints the statements themselves.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import event

from bench.admission import PROJECT
from tests.support.env import broker_env, fresh_database


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="postgresql")
    ap.add_argument("--show", default="")
    args = ap.parse_args()
    from bench import noop

    noop.install()
    tmp = Path(tempfile.mkdtemp(prefix="aifa-queries-"))
    with fresh_database(args.db, tmp) as url, broker_env(tmp, url, run_tracker=False) as env:
        r = env.call("POST", "/v1/clusters", env.qm, json={
            "name": "noop", "adapter": "noop", "connection": {}, "default_partition": "cpu"})
        assert r.status_code == 201, r.text
        env.setup_project(PROJECT, amount=1e12, cluster="noop")
        who = env.auth("alice")
        body = {"project": PROJECT, "cluster": "noop", "script": "true", "time_limit_minutes": 5}
        statements: list[str] = []
        commits: list[int] = [0]

        @event.listens_for(env.engine, "before_cursor_execute")
        def _count(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
            statements.append(statement)

        @event.listens_for(env.engine, "commit")
        def _commit(conn: Any) -> None:
            commits[0] += 1

        job = env.call("POST", "/v1/jobs", who, json=body).json()["id"]
        kinds: dict[str, tuple[str, str, dict[str, Any] | None, dict[str, str]]] = {
            "submit": ("POST", "/v1/jobs", body, {}),
            "submit+key": ("POST", "/v1/jobs", body, {"Idempotency-Key": "k-{i}"}),
            "estimate": ("POST", "/v1/jobs/estimate", body, {}),
            "job": ("GET", f"/v1/jobs/{job}", None, {}),
            "jobs": ("GET", "/v1/jobs?limit=20", None, {}),
            "projects": ("GET", "/v1/projects", None, {}),
            "usage": ("GET", f"/v1/projects/{PROJECT}/usage", None, {}),
        }
        out = {}
        for kind, (method, path, payload, extra) in kinds.items():
            for i in range(3):  # the last one is counted (caches warm)
                statements.clear()
                commits[0] = 0
                headers = {k: v.format(i=i) for k, v in extra.items()}
                r = env.call(method, path, {**who, **headers}, json=payload)
                assert r.status_code < 300, r.text
            out[kind] = {"statements": len(statements), "commits": commits[0]}
            print(f"{kind:12s} {out[kind]}")
            if kind == args.show:
                for s in statements:
                    print("   ", " ".join(s.split())[:160])
        print(json.dumps(out))


if __name__ == "__main__":
    main()
