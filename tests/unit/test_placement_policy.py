"""Placement's choice policy and probing, with fakes (issue 12 point 1).

The live behaviour — two Slurm clusters, GPUs occupied on one, budget exhausted on
one, both impossible, one down — is tested in tests/integration/test_placement_slurm.py."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.adapter import ClusterUnreachable, JobSpec, StartEstimate, SubmitRejected
from broker.models import Cluster
from broker.policy import Denial
from broker.services.placement import Candidate, choose, explain, partition_for, probe

NOW = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)
SPEC = JobSpec(tag="0" * 32, username="alice", account="proj-a", script="#!/bin/sh\n", time_limit_minutes=5)


def cand(name: str, *, start_in: float | None = 0, estimate: int = 10, remaining: int | None = 100,
         denials: list[Denial] | None = None) -> Candidate:
    return Candidate(name, "gpu", denials=list(denials or []), unit="gpu_hours", estimate=estimate,
                     remaining=remaining, start=None if start_in is None else NOW + timedelta(seconds=start_in),
                     method="test-only", spec=SPEC)


def test_earliest_start_wins_then_lowest_budget_share() -> None:
    soon, later = cand("a", start_in=3600, remaining=1000), cand("b", start_in=0, remaining=20)
    assert choose([soon, later], policy="earliest_start", now=NOW) is later
    # the same start (within the tolerance): the smaller share of what is left decides
    x, y = cand("x", start_in=10, remaining=50), cand("y", start_in=30, remaining=500)
    assert choose([x, y], policy="earliest_start", tolerance_seconds=60, now=NOW) is y
    assert choose([x, y], policy="earliest_start", tolerance_seconds=0, now=NOW) is x


def test_lowest_share_policy_puts_budget_first() -> None:
    soon, later = cand("a", start_in=0, remaining=20), cand("b", start_in=3600, remaining=1000)
    assert choose([soon, later], policy="lowest_share", now=NOW) is later
    assert choose([soon, later], policy="earliest_start", now=NOW) is soon


def test_unknown_start_ranks_after_known_ones_and_ties_break_by_name() -> None:
    unknown, known = cand("a", start_in=None, remaining=10_000), cand("b", start_in=7200)
    assert choose([unknown, known], policy="earliest_start", now=NOW) is known
    assert choose([cand("b"), cand("a")], policy="earliest_start", now=NOW).cluster == "a"  # type: ignore[union-attr]


def test_denied_candidates_are_never_chosen_and_none_when_all_denied() -> None:
    denied = cand("a", start_in=0, denials=[Denial("quota_exceeded", "no budget")])
    ok = cand("b", start_in=99_999)
    assert choose([denied, ok], policy="earliest_start", now=NOW) is ok
    assert choose([denied], policy="earliest_start", now=NOW) is None
    text = explain(None, [denied], "earliest_start")
    assert "a: quota_exceeded (no budget)" in text


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown placement policy"):
        choose([cand("a")], policy="random")


def test_explain_names_the_choice_and_each_other_candidate() -> None:
    a, b = cand("a", start_in=0), cand("b", start_in=3600, denials=[])
    c = cand("c", denials=[Denial("cluster_draining", "Cluster c is draining")])
    text = explain(a, [a, b, c], "earliest_start")
    assert text.startswith("a (gpu) by earliest_start")
    assert "b: eligible, start 2026-11-30T06:00:00Z (test-only)" in text
    assert "c: cluster_draining" in text


def test_partition_classes_map_per_cluster() -> None:
    leo = Cluster(name="leo", adapter="slurm_ssh", default_partition="lrd_all_serial",
                  partition_classes={"gpu": "boost_usr_prod"})
    other = Cluster(name="other", adapter="slurm_ssh", default_partition="cpu", partition_classes={})
    assert partition_for(leo, "gpu") == "boost_usr_prod"
    assert partition_for(other, "gpu") == "gpu"  # not mapped: the same name
    assert partition_for(leo, None) == "lrd_all_serial"  # no class: the cluster's default


class FakeAdapter:
    """Stands in for a cluster adapter's expected_start."""

    def __init__(self, answer: Any = None, *, delay: float = 0.0) -> None:
        self.answer, self.delay, self.calls = answer, delay, 0
        self.release = threading.Event()

    def expected_start(self, spec: JobSpec) -> StartEstimate | None:
        self.calls += 1
        if self.delay:
            self.release.wait(self.delay)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer  # type: ignore[no-any-return]


def test_probe_fills_starts_denies_refusals_and_never_waits_for_a_slow_cluster() -> None:
    fast = FakeAdapter(StartEstimate(NOW, "test-only", "Job 1 to start at ..."))
    refused = FakeAdapter(SubmitRejected("Requested node configuration is not available", code="submit_rejected"))
    down = FakeAdapter(ClusterUnreachable("connection refused"))
    slow = FakeAdapter(StartEstimate(NOW, "test-only"), delay=30)
    silent = FakeAdapter(None)
    cands = [cand(n, start_in=None) for n in ("fast", "refused", "down", "slow", "silent")]
    skipped = cand("draining", start_in=None, denials=[Denial("cluster_draining", "draining")])
    draining = FakeAdapter(StartEstimate(NOW, "test-only"))
    adapters: dict[str, Any] = {"fast": fast, "refused": refused, "down": down, "slow": slow,
                                "silent": silent, "draining": draining}
    t0 = datetime.now(tz=UTC)
    probe([*cands, skipped], adapters, timeout=0.5)
    took = (datetime.now(tz=UTC) - t0).total_seconds()
    slow.release.set()
    assert took < 3, took  # bounded by the probe timeout, not by the slow cluster
    by = {c.cluster: c for c in cands}
    assert by["fast"].start == NOW and by["fast"].method == "test-only" and by["fast"].eligible
    assert [d.code for d in by["refused"].denials] == ["scheduler_refused"]
    assert [d.code for d in by["down"].denials] == ["cluster_unreachable"]
    assert by["slow"].eligible and by["slow"].start is None and by["slow"].method == "timeout"
    assert by["silent"].eligible and by["silent"].method == "none"
    assert draining.calls == 0  # a denied candidate is never asked
    assert choose([*cands, skipped], policy="earliest_start", now=NOW) is by["fast"]
