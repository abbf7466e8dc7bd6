"""TRES (trackable resources) in the shapes Slurm prints them.

Three shapes reach the adapters:

- strings such as ``"cpu=2,mem=500M,node=1,billing=2,gres/gpu=1"`` (squeue
  ``tres_alloc_str``, ``sacct -P AllocTRES``, partition ``tres``);
- lists of ``{"type", "name", "id", "count"}`` objects (sacct JSON and slurmdb
  REST ``tres.allocated``), where a GPU is ``{"type": "gres", "name": "gpu"}``;
- node ``gres`` strings such as ``"gpu:4"``, ``"gpu:a100:4(S:0-1)"``.

Every function returns broker TRES names (``cpu``, ``mem`` in MB, ``node``,
``billing``, ``gres/gpu``...) mapped to counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_MEM_UNITS_TO_MB = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024, "P": 1024.0**3}
_NUMBER_RE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)(?P<unit>[KMGTP]?)$", re.IGNORECASE)
_GRES_COUNT_RE = re.compile(r"^(?P<name>[^:()]+)(?::(?P<type>[^:()]+))?(?::(?P<count>\d+))?")

#: TRES whose values carry a size unit (converted to MB).
MEMORY_TRES = frozenset({"mem", "vmem", "fs/disk"})


def _parse_amount(name: str, text: str) -> float | None:
    m = _NUMBER_RE.match(text.strip())
    if not m:
        return None
    value = float(m.group("num"))
    unit = m.group("unit").upper()
    if name in MEMORY_TRES:
        return value * _MEM_UNITS_TO_MB[unit or "M"]
    if unit:  # e.g. billing=1K on large jobs
        return value * {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}[unit]
    return value


def parse_tres_string(text: str | None) -> dict[str, float]:
    """``"cpu=2,mem=1G,gres/gpu=1"`` → ``{"cpu": 2, "mem": 1024, "gres/gpu": 1}``.

    Unparseable items are skipped; an empty or missing string gives ``{}``.
    """
    result: dict[str, float] = {}
    if not text:
        return result
    for item in text.split(","):
        name, sep, amount = item.strip().partition("=")
        if not sep or not name:
            continue
        value = _parse_amount(name, amount)
        if value is not None:
            result[name] = value
    return result


def tres_key(entry: Mapping[str, Any]) -> str | None:
    """The broker TRES name of one ``{"type", "name"}`` object (``gres/gpu``, ``cpu``...)."""
    kind = entry.get("type")
    if not isinstance(kind, str) or not kind:
        return None
    name = entry.get("name")
    return f"{kind}/{name}" if isinstance(name, str) and name else kind


def tres_list_to_map(entries: Iterable[Any] | None) -> dict[str, float]:
    """sacct/slurmdb ``[{"type","name","count"}...]`` → ``{name: count}``.

    Entries without a usable count (``null``, negative placeholders such as
    ``-2`` for unset energy) are left out.
    """
    result: dict[str, float] = {}
    for entry in entries or ():
        if not isinstance(entry, Mapping):
            continue
        key = tres_key(entry)
        count = entry.get("count")
        if key is None or isinstance(count, bool) or not isinstance(count, int | float):
            continue
        if count < 0:
            continue
        result[key] = float(count)
    return result


def gres_counts(gres: str | None) -> dict[str, int]:
    """Node ``gres`` string → counts per gres name: ``"gpu:a100:4(S:0-1),shard:8"`` →
    ``{"gpu": 4, "shard": 8}``. An item without a count counts as 1."""
    result: dict[str, int] = {}
    if not gres or gres in {"(null)", "none"}:
        return result
    for item in _split_top_level(gres):
        m = _GRES_COUNT_RE.match(item.strip())
        if not m:
            continue
        name = m.group("name")
        count_text = m.group("count")
        if count_text is None and m.group("type") and m.group("type").isdigit():
            count_text = m.group("type")
        count = int(count_text) if count_text else 1
        result[name] = result.get(name, 0) + count
    return result


def gpus_in_gres(gres: str | None) -> int:
    """Number of ``gpu`` gres in a node ``gres`` string."""
    return gres_counts(gres).get("gpu", 0)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses (``gpu:2(S:0,1)``)."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        items.append("".join(current))
    return [i for i in items if i.strip()]
