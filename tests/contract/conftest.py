"""Collects the contract targets from every ``factory_*.py`` beside this file."""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Iterator

import pytest

from tests.contract.target import ContractTarget

_HERE = pathlib.Path(__file__).parent


def _all_params() -> list[object]:
    params: list[object] = []
    for path in sorted(_HERE.glob("factory_*.py")):
        module = importlib.import_module(f"tests.contract.{path.stem}")
        params.extend(module.targets())
    return params


@pytest.fixture(scope="module", params=_all_params())
def target(request: pytest.FixtureRequest) -> Iterator[ContractTarget]:
    made: ContractTarget = request.param()
    yield made
    made.adapter.close()
