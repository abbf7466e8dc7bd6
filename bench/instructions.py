"""Instructions of the real server process per request: the figure to compare code changes by.

    .venv/bin/python -m bench.instructions [--db postgresql] [--n 40] [--kinds submit,get,...]

Serves the real app (``bench.noop``, one worker, tracker off) under
``valgrind --tool=callgrind --instr-atstart=no``; the client stays outside valgrind.
For each kind of request it warms up, switches instrumentation on
(``callgrind_control -i on``), sends ``n`` requests one after the other (``list``: a page of 20 jobs), switches it
off and dumps: instructions per request of the server process, the same whatever
else the machine is doing (wall-clock figures on a shared 2-vCPU host move by ±40 %).
Dumps stay in ``--out`` for ``callgrind_annotate``. Kind ``bare``: B3's baseline
(bench/bare.py, its ``POST /bare``), served the same way on the same database.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

from bench.admission import PROJECT, noop_broker
from bench.harness import PY, free_port, server
from bench.loadgen import Request, run_load

KINDS = ("submit", "estimate", "get", "list", "projects", "usage", "healthz")
#: jobs on the project before ``list`` is counted: one default page (GET /v1/jobs)
LIST_PAGE = 20
#: B3's baseline (bench/bare.py's ``POST /bare``), served under valgrind beside the broker
BARE = "bare"


def _requests(kind: str, head: dict[str, str], job_id: str, n: int) -> list[Request]:
    body = {"project": PROJECT, "cluster": "noop", "script": "true", "time_limit_minutes": 5}
    one: Request = {
        "submit": ("POST", "/v1/jobs", head, body),
        "estimate": ("POST", "/v1/jobs/estimate", head, body),
        "get": ("GET", f"/v1/jobs/{job_id}", head, None),
        "list": ("GET", f"/v1/jobs?project={PROJECT}", head, None),
        "projects": ("GET", "/v1/projects", head, None),
        "usage": ("GET", f"/v1/projects/{PROJECT}/usage", head, None),
        "healthz": ("GET", "/healthz", {}, None),
    }[kind]
    return [one] * n


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _dump_total(out_dir: str, pid: int) -> int:
    """Instructions in the newest dump of ``pid`` (its ``totals:`` line; ``summary:`` is 0
    when instrumentation started switched off)."""
    dumps = sorted(glob.glob(f"{out_dir}/callgrind.out.{pid}.*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    with open(dumps[-1]) as fh:
        for line in fh:
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {dumps[-1]}")


def _count(pid: int, base: str, reqs: list[Request], out_dir: str, kind: str) -> float:
    """M instructions per request of server ``pid`` for ``reqs`` (after 10 not counted)."""
    run_load(base, reqs[:10], concurrency=1)  # warm-up, not counted
    _control(pid, "-z")
    _control(pid, "-i", "on")
    res = run_load(base, reqs, concurrency=1)
    _control(pid, "-i", "off")
    _control(pid, "-d")
    assert res.errors() == 0, (kind, res.statuses)
    per = round(_dump_total(out_dir, pid) / len(reqs) / 1e6, 3)
    print(f"{kind:10s} {per:7.3f} M instructions/request", flush=True)
    return per


def measure(*, db: str, n: int, kinds: list[str], out_dir: str) -> dict[str, Any]:
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("needs valgrind (Debian package valgrind)")
    wrap = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out_dir}/callgrind.out.%p"]
    results: dict[str, Any] = {}
    with noop_broker(db, workers=1, wrap=wrap, start_timeout=600) as b:
        pid = b["proc"].pid
        head = {"Authorization": f"Bearer {b['token']}"}
        first = run_load(b["base"], _requests("submit", head, "", 1), concurrency=1, keep_bodies=True)
        job_id = json.loads(first.bodies[0])["id"]
        if "list" in kinds:  # a full default page, as B5's readers get
            run_load(b["base"], _requests("submit", head, "", LIST_PAGE - 1), concurrency=1)
        for kind in kinds:
            if kind != BARE:
                results[kind] = _count(pid, b["base"], _requests(kind, head, job_id, n), out_dir, kind)
        if BARE in kinds:
            port = free_port()
            argv = [*wrap, PY, "-m", "bench.bare", "--port", str(port)]
            with server(argv, b["env"], port, timeout=600) as bare:
                body = {"project": PROJECT, "cluster": "noop", "script": "true", "time_limit_minutes": 5}
                results[BARE] = _count(bare.pid, f"http://127.0.0.1:{port}",
                                       [("POST", "/bare", head, body)] * n, out_dir, BARE)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default="postgresql", choices=["postgresql", "sqlite"])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"of {', '.join(KINDS)}, {BARE}")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    out_dir = args.out or tempfile.mkdtemp(prefix="aifa-callgrind-")
    os.makedirs(out_dir, exist_ok=True)
    res = measure(db=args.db, n=args.n, kinds=args.kinds.split(","), out_dir=out_dir)
    print(json.dumps({"db": args.db, "n": args.n, "M_instructions": res, "dumps": out_dir}))


if __name__ == "__main__":
    main()
