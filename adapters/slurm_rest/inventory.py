"""Partitions and node sizes from ``GET partitions`` + ``GET nodes``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapters.slurm_rest.layers import ApiLayer
from adapters.slurm_rest.model import NodeRecord, PartitionRecord
from broker.adapter import PartitionInfo


def partitions(
    layer: ApiLayer, partitions_body: Mapping[str, Any], nodes_body: Mapping[str, Any]
) -> list[PartitionInfo]:
    """One :class:`PartitionInfo` per partition; per-node sizes are those of the
    largest node in it (a job fits when some node fits it). With a single
    partition, that one is the default even where the version hides the flag."""
    records = [layer.parse_partition(item) for item in layer.items(partitions_body, "partitions")]
    nodes = [layer.parse_node(item) for item in layer.items(nodes_body, "nodes")]
    single = len(records) == 1
    return [_info(record, _members(record, nodes), single) for record in records]


def _members(partition: PartitionRecord, nodes: list[NodeRecord]) -> list[NodeRecord]:
    return [node for node in nodes if partition.name in node.partitions]


def _info(record: PartitionRecord, nodes: list[NodeRecord], single: bool) -> PartitionInfo:
    cpus = max((n.cpus for n in nodes), default=0)
    if not cpus and record.total_nodes:
        cpus = record.total_cpus // record.total_nodes
    gpus = max((n.gpus for n in nodes), default=0)
    tres = dict(record.tres)
    if gpus and "gres/gpu" not in tres:
        tres["gres/gpu"] = float(sum(n.gpus for n in nodes))
    return PartitionInfo(
        name=record.name,
        default=record.default or single,
        nodes=record.total_nodes or len(nodes),
        cpus_per_node=cpus,
        gpus_per_node=gpus,
        memory_per_node_mb=max((n.real_memory_mb for n in nodes), default=0),
        max_time_minutes=record.max_time_minutes,
        tres=tres,
    )
