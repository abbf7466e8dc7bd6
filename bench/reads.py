"""B5: 500 concurrent clients reading jobs, projects and usage for 60 s.

Against the broker with the ``noop`` cluster (tracker off), so every adapter call
during the window would have been caused by a read: the adapter call counters
(``/metrics``, summed over the workers) must not move. ``read_mix`` and
``adapter_calls`` are reusable by other load tests.
"""

from __future__ import annotations

import json
import re

import httpx

from bench.admission import PROJECT, noop_broker
from bench.harness import Figure
from bench.loadgen import Request, run_for, run_load


def adapter_calls(base: str) -> float:
    """Adapter calls so far, every method and process together (from ``/metrics``)."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r'^aifa_adapter_call_seconds_count\{[^}]*\} (\S+)$', text, re.M))


def read_mix(head: dict[str, str], job_ids: list[str]) -> list[Request]:
    """One round of the read mix: a job, the job list, the projects, the project's usage."""
    out: list[Request] = [("GET", f"/v1/jobs/{j}", head, None) for j in job_ids[:4]]
    out += [("GET", "/v1/jobs?limit=20", head, None), ("GET", "/v1/projects", head, None),
            ("GET", f"/v1/projects/{PROJECT}/usage", head, None)]
    return out


def b5(*, seconds: float, clients: int = 500, workers: int = 2) -> list[Figure]:
    rate = Figure("B5", f"{clients} concurrent readers for {seconds:.0f} s, {workers} workers, PostgreSQL",
                  "200 answers/s", "≥ 400 req/s", min_value=400)
    p95 = Figure("B5", "read latency p95 (every answer, 503s included)", "ms", "< 500 ms", max_value=500)
    errors = Figure("B5", "read errors", "errors", "0", max_value=0)
    calls = Figure("B5", "scheduler calls caused by reads", "calls", "0", max_value=0)
    body = {"project": PROJECT, "cluster": "noop", "script": "true", "time_limit_minutes": 5}
    with noop_broker("postgresql", workers=workers) as b:
        head = {"Authorization": f"Bearer {b['token']}"}
        made = run_load(b["base"], [("POST", "/v1/jobs", head, body)] * 40, concurrency=4, keep_bodies=True)
        job_ids = [json.loads(x)["id"] for x in made.bodies]
        mix = read_mix(head, job_ids)
        before = adapter_calls(b["base"])
        res = run_for(b["base"], lambda i: mix[i % len(mix)], concurrency=clients, seconds=seconds)
        calls.runs.append(adapter_calls(b["base"]) - before)
        # a 503 is not a read served: the figure is 200 answers per second
        rate.runs.append(res.statuses.get(200, 0) / res.wall_s if res.wall_s else 0.0)
        p95.runs.append(res.p95_ms)
        errors.runs.append(res.errors(ok=(200,)))
        rate.extra.update(statuses=dict(res.statuses), p50_ms=res.p50_ms, requests=res.requests,
                          all_answers_per_s=res.rate)
    return [rate, p95, errors, calls]
