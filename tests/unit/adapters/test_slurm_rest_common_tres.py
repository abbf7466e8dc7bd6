"""Table tests of the shared TRES readers (adapters/slurm_common/tres.py)."""

from __future__ import annotations

import pytest

from adapters.slurm_common import tres


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "cpu=1,mem=500M,node=1,billing=1,gres/gpu=1",
            {"cpu": 1, "mem": 500, "node": 1, "billing": 1, "gres/gpu": 1},
        ),
        ("cpu=8,mem=2G,node=2", {"cpu": 8, "mem": 2048, "node": 2}),
        ("mem=1T", {"mem": 1024 * 1024}),
        ("mem=512K", {"mem": 0.5}),
        ("billing=2K", {"billing": 2000}),
        ("", {}),
        (None, {}),
        ("cpu=x,,=3,gres/gpu=2", {"gres/gpu": 2}),
    ],
)
def test_parse_tres_string(text: str | None, expected: dict[str, float]) -> None:
    assert tres.parse_tres_string(text) == expected


def test_tres_list_to_map_skips_placeholders() -> None:
    entries = [
        {"type": "cpu", "name": None, "id": 1, "count": 2},
        {"type": "mem", "name": "", "id": 2, "count": 500},
        {"type": "energy", "name": "", "id": 3, "count": -2},
        {"type": "energy", "name": None, "id": 3, "count": None},
        {"type": "gres", "name": "gpu", "id": 1001, "count": 1},
        "junk",
        {"name": "x", "count": 1},
    ]
    assert tres.tres_list_to_map(entries) == {"cpu": 2, "mem": 500, "gres/gpu": 1}


@pytest.mark.parametrize(
    ("gres", "gpus"),
    [
        ("gpu:4", 4),
        ("gpu:a100:4(S:0-1)", 4),
        ("gpu:2(S:0,1),shard:8", 2),
        ("gpu:a100:2,gpu:v100:1", 3),
        ("gpu", 1),
        ("", 0),
        ("(null)", 0),
        (None, 0),
    ],
)
def test_gpus_in_gres(gres: str | None, gpus: int) -> None:
    assert tres.gpus_in_gres(gres) == gpus
