"""Schemathesis over the broker's own OpenAPI document (issue 10): for every ``/v1``
operation, positive and negative cases generated from the document, sent over real
HTTP to a live broker, as three roles (member, quota manager, sysadmin), on SQLite
and PostgreSQL. Bounded (a fixed number of examples per operation, fixed seed).

Every answer must: not be a 5xx other than 503; if it is an error, be
``application/problem+json`` with a ``code``; use a status code, content type,
headers and body schema that the document declares for that operation.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.env import BrokerEnv
from tests.support.server import live_server

#: examples per operation and generation mode; AIFA_FUZZ_EXAMPLES raises it for a long run
EXAMPLES = int(os.environ.get("AIFA_FUZZ_EXAMPLES", "8"))
ROLES: dict[str, tuple[str, ...]] = {
    "member": ("alice",),
    "quota_manager": ("qm-fuzz", "quota_manager"),
    "sysadmin": ("root-fuzz", "sysadmin"),
}
CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def _own_checks(response: Any) -> list[str]:
    """The broker's own promises about every answer."""
    problems = []
    status = response.status_code
    if status >= 500 and status != 503:
        problems.append(f"server error {status}: {response.text[:300]}")
    if status >= 400:
        ctype = response.headers.get("content-type") or ""
        ctype = ctype[0] if isinstance(ctype, list) else ctype  # schemathesis keeps every value
        if ctype != "application/problem+json":
            problems.append(f"{status} answered as {ctype}")
        else:
            body = response.json()
            if not isinstance(body, dict) or not body.get("code") or body.get("status") != status:
                problems.append(f"{status} problem without code/status: {response.text[:300]}")
    return problems


def _with_known(pair: tuple[Any, list[bool]], known: dict[str, str]) -> Any:
    """Half of the cases name objects that exist (the project, the local cluster, alice,
    a real allocation and job), so the handlers behind the 404s get fuzzed too."""
    case, flips = pair
    for (name, _), flip in zip(sorted(case.path_parameters.items()), flips, strict=False):
        if flip and name in known:
            case.path_parameters[name] = known[name]
    return case


def _run_operation(operation: Any, mode: GenerationMode, call: Callable[[Any], Any],
                   failures: list[str], statuses: Counter[int], known: dict[str, str]) -> None:
    cases = st.tuples(operation.as_strategy(generation_mode=mode), st.lists(st.booleans(), min_size=3, max_size=3))

    @given(case=cases.map(lambda pair: _with_known(pair, known)))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=False,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        response = call(case)
        statuses[response.status_code] += 1
        where = f"{case.method} {case.formatted_path} ({mode.value})"
        failures.extend(f"{where}: {p}" for p in _own_checks(response))
        if mode is GenerationMode.POSITIVE:
            try:
                case.validate_response(response, checks=CHECKS)
            except (AssertionError, FailureGroup) as exc:  # how schemathesis reports what it found
                failures.append(f"{where}: {str(exc).strip()[:600]}")

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # an operation with nothing to get wrong


@pytest.mark.timeout(900)
@pytest.mark.parametrize("role", list(ROLES))
def test_schemathesis_no_5xx_problems_only_documented_answers(env: BrokerEnv, role: str) -> None:
    alloc = env.setup_project(pi="bob")
    job = env.call("POST", "/v1/jobs", env.auth("alice"),
                   json={"project": "EHPC-TEST-001", "script": "sleep 30", "time_limit_minutes": 5}).json()
    known = {"code": "EHPC-TEST-001", "name": "local", "user": "alice", "allocation_id": str(alloc["id"]),
             "job_id": job["id"]}
    who = env.auth(*ROLES[role])
    schema = schemathesis.openapi.from_dict(env.app.openapi())
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    with live_server(env.app) as base, requests.Session() as session:
        session.headers.update(who)

        def call(case: Any) -> Any:
            # an open project event stream never ends: its status and headers are what can be
            # checked, and a short read timeout ends it (3 cases × 30 s were half the run)
            stream = case.formatted_path.endswith("/events") and not case.formatted_path.startswith("/v1/jobs/")
            return case.call(base_url=base, session=session, timeout=3 if stream else 30)

        operations = [r.ok() for r in schema.get_all_operations()]
        for operation in operations:
            if not operation.path.startswith("/v1/"):
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _run_operation(operation, mode, call, failures, statuses, known)
    assert sum(statuses.values()) >= EXAMPLES * 20, statuses  # it really ran
    unique = sorted(set(failures))
    assert not unique, f"{len(unique)} distinct failures ({dict(statuses)}):\n" + "\n".join(unique[:40])
