"""Answers serialised once, by pydantic, straight to JSON bytes.

A route that returns a model lets FastAPI check it against ``response_model``, turn
it into Python objects and ``json.dumps`` those — for a page of jobs that was a
fifth of the request's CPU. The read paths build their answers themselves (already
valid): as models, answered with the bytes of their own serialisation, or — where
building the models cost more than the rest (job reads) — as plain data with the
models' fields and values, which pydantic-core writes to the same bytes
(tests/integration/test_read_answers.py). The route keeps its ``response_model`` for
the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

import pydantic_core
from fastapi import Response


def json_data(data: Any) -> Response:
    """Plain data (dicts, lists, numbers, strings, dates) as JSON in one pass of
    pydantic-core — what FastAPI's ``jsonable_encoder`` + ``json.dumps`` give, without
    walking every value in Python first (the portfolio of 1,000 allocations: ~30,000)."""
    return Response(pydantic_core.to_json(data), media_type="application/json")
