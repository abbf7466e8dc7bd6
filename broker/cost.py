"""The cost model: what one hour of each TRES costs in an allocation's unit.

A cluster's ``cost_model`` maps partitions (``"*"`` = any other) to units to TRES
weights, like Slurm's ``TRESBillingWeights``::

    {"partitions": {"gpu": {"gpu_hours": {"gres/gpu": 1.0},
                            "billing_hours": {"cpu": 1.0, "gres/gpu": 16.0}},
                    "*":   {"core_hours": {"cpu": 1.0}}}}

Units absent from the model fall back to :data:`DEFAULT_WEIGHTS`. Estimate =
requested TRES × time limit; charge = allocated TRES × elapsed. Results are in
micro-units (see :mod:`broker.models`), rounded up so estimates never undershoot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

UNITS = ("gpu_hours", "node_hours", "core_hours", "billing_hours")
#: the largest amount the broker handles, in micro-units (10^12 units): every balance,
#: estimate and charge fits a signed 64-bit column with room to add a few of them up
MAX_MICRO = 10**18
#: the largest weight of one TRES-hour (finite: 1e999 parses as Infinity)
MAX_WEIGHT = 1e6

DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "gpu_hours": {"gres/gpu": 1.0},
    "node_hours": {"node": 1.0},
    "core_hours": {"cpu": 1.0},
    "billing_hours": {"billing": 1.0},
}


class CostModelError(ValueError):
    """The cost model in a cluster definition is malformed."""


def validate_cost_model(model: Mapping[str, Any]) -> None:
    """Raise :class:`CostModelError` unless ``model`` has the documented shape."""
    partitions = model.get("partitions", {})
    if set(model) - {"partitions"} or not isinstance(partitions, Mapping):
        raise CostModelError("cost_model must be {'partitions': {name: {unit: {tres: weight}}}}")
    for part, units in partitions.items():
        if not isinstance(units, Mapping):
            raise CostModelError(f"cost_model partition {part!r} must map units to weights")
        for unit, weights in units.items():
            if unit not in UNITS:
                raise CostModelError(f"unknown unit {unit!r} (known: {', '.join(UNITS)})")
            if not isinstance(weights, Mapping) or not all(
                isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and 0 <= w <= MAX_WEIGHT
                for w in weights.values()
            ):
                raise CostModelError(f"weights of {part}/{unit} must be numbers from 0 to {MAX_WEIGHT:g}")


def weights_for(model: Mapping[str, Any], partition: str | None, unit: str) -> Mapping[str, float]:
    partitions = model.get("partitions", {})
    for key in (partition, "*"):
        if key is not None and unit in partitions.get(key, {}):
            return dict(partitions[key][unit])
    if unit not in DEFAULT_WEIGHTS:
        raise CostModelError(f"unknown unit {unit!r}")
    return DEFAULT_WEIGHTS[unit]


def request_tres(
    *, nodes: int, ntasks_per_node: int, cpus_per_task: int, gpus_per_node: int,
    memory_per_node_mb: int | None,
) -> dict[str, float]:
    """The TRES a request asks for, named as Slurm names them."""
    cpus = nodes * ntasks_per_node * cpus_per_task
    return {
        "cpu": float(cpus),
        "node": float(nodes),
        "gres/gpu": float(nodes * gpus_per_node),
        "mem": float(nodes * (memory_per_node_mb or 0)),
        "billing": float(cpus),
    }


def cost_micro(
    model: Mapping[str, Any], *, partition: str | None, unit: str,
    tres: Mapping[str, float], seconds: float,
) -> int:
    """Cost of holding ``tres`` for ``seconds``, in micro-units of ``unit``, at most
    :data:`MAX_MICRO` (a result of ``MAX_MICRO`` means "does not fit": callers that
    must refuse such an amount compare with it)."""
    weights = weights_for(model, partition, unit)
    effective = dict(tres)
    if "billing" in weights and not effective.get("billing"):
        effective["billing"] = effective.get("cpu", 0.0)  # no TRESBillingWeights: billing = cpus
    per_hour = sum(float(w) * float(effective.get(name, 0.0)) for name, w in weights.items())
    micro = per_hour * max(0.0, seconds) * 1_000_000 / 3600
    if not math.isfinite(micro) or micro >= MAX_MICRO:  # a weight stored before weights were bounded
        return MAX_MICRO
    return max(0, math.ceil(micro - 1e-6))


# --- what Slurm allocates ---------------------------------------------------------------
#
# Memory rule (the broker's, stated in docs/directives.md): a job is priced as
# max(its CPUs, the CPUs its memory corresponds to), where one CPU "carries"
# the node's memory / the node's CPUs — like Slurm's PriorityFlags=MAX_TRES on a
# cpu+mem billing. The same rule applies to the estimate and to the charge, so a
# job that takes a node's whole memory on one CPU costs what it blocks.


def _node_shape(partition: Mapping[str, Any] | None) -> tuple[int, int, int]:
    p = partition or {}
    return (int(p.get("cpus_per_node") or 0), int(p.get("memory_per_node_mb") or 0),
            int(p.get("gpus_per_node") or 0))


def find_partition(partitions: Sequence[Mapping[str, Any]], name: str | None) -> dict[str, object] | None:
    """The partition ``name`` among a cluster's discovered ones (what :func:`memory_rule` reads)."""
    return next((dict(p) for p in partitions if p.get("name") == name), None)


def memory_rule(tres: Mapping[str, float], partition: Mapping[str, Any] | None) -> dict[str, float]:
    """``tres`` with ``cpu`` (and ``billing``, when it only counts CPUs) raised to the
    CPUs the job's memory corresponds to on this partition's nodes."""
    out = dict(tres)
    node_cpus, node_mem, _ = _node_shape(partition)
    mem = float(out.get("mem", 0.0))
    if node_cpus <= 0 or node_mem <= 0 or mem <= 0:
        return out
    nodes = max(1.0, float(out.get("node", 1.0)))
    mem_cpus = min(math.ceil(mem * node_cpus / node_mem - 1e-9), int(nodes) * node_cpus)
    cpus = float(out.get("cpu", 0.0))
    if mem_cpus > cpus:
        if float(out.get("billing", cpus)) <= cpus:
            out["billing"] = float(mem_cpus)
        out["cpu"] = float(mem_cpus)
    return out


def allocation_tres(
    *, nodes: int, cpus: int, gpus_per_node: int, memory_per_node_mb: int | None, exclusive: bool,
    partition: Mapping[str, Any] | None,
) -> dict[str, float]:
    """The TRES the broker prices for one job (one array task): what Slurm will
    allocate (:func:`slurm_tres`) under the memory rule (:func:`memory_rule`)."""
    return memory_rule(slurm_tres(nodes=nodes, cpus=cpus, gpus_per_node=gpus_per_node,
                                  memory_per_node_mb=memory_per_node_mb, exclusive=exclusive,
                                  partition=partition), partition)


def slurm_tres(
    *, nodes: int, cpus: int, gpus_per_node: int, memory_per_node_mb: int | None, exclusive: bool,
    partition: Mapping[str, Any] | None,
) -> dict[str, float]:
    """The TRES Slurm allocates for one job (one array task): ``--exclusive`` takes
    whole nodes (all CPUs, memory and GPUs of the partition's nodes); memory
    without ``--mem`` is taken as the CPUs' share of a node (an upper bound for a
    site's DefMemPerCPU)."""
    node_cpus, node_mem, node_gpus = _node_shape(partition)
    share = node_mem / node_cpus if node_cpus and node_mem else 0.0
    mem = float(nodes * memory_per_node_mb) if memory_per_node_mb else math.ceil(cpus * share)
    gpus = float(nodes * gpus_per_node)
    cpu = float(cpus)
    if exclusive and node_cpus:
        cpu = float(max(cpus, nodes * node_cpus))
        mem = float(max(mem, nodes * node_mem))
        gpus = float(max(gpus, nodes * node_gpus))
    return {"cpu": cpu, "node": float(nodes), "gres/gpu": gpus, "mem": float(mem), "billing": cpu}


def partition_misfit(
    *, nodes: int, cpus_per_node: int, gpus_per_node: int, memory_per_node_mb: int | None,
    partition: Mapping[str, Any] | None,
) -> str | None:
    """Why the partition's nodes cannot hold the request (None when they can, or when
    the partition's shape is not known)."""
    if not partition:
        return None
    node_cpus, node_mem, node_gpus = _node_shape(partition)
    name, count = partition.get("name", "?"), int(partition.get("nodes") or 0)
    if count and nodes > count:
        return f"{nodes} nodes asked; partition {name} has {count}"
    if node_cpus and cpus_per_node > node_cpus:
        return f"{cpus_per_node} CPUs per node asked; the nodes of partition {name} have {node_cpus}"
    if gpus_per_node > node_gpus and (node_cpus or node_gpus):
        return f"{gpus_per_node} GPUs per node asked; the nodes of partition {name} have {node_gpus}"
    if node_mem and memory_per_node_mb and memory_per_node_mb > node_mem:
        return f"{memory_per_node_mb} MB per node asked; the nodes of partition {name} have {node_mem} MB"
    return None
