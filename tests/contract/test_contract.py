"""The adapter contract suite: the same test bodies for every target.

Targets come from ``factory_*.py`` beside this file (see ``conftest.py``). To keep
CI time small on real clusters, one module-scoped :class:`Batch` submits every job
the suite needs at once, right at the start; the tests then wait for "their" job,
so the jobs (including the one that must hit its time limit) run in parallel.

Optional ``target.extra`` keys:

``scheduler_calls``
    a zero-argument callable returning how many scheduler queries the adapter has
    made so far; when given, a batched poll must take at most two (queue +
    accounting) whatever the number of jobs.
``timeout_wait``
    seconds to wait for the time-limit job (default ``settle_timeout + 120``;
    on Slurm a 1-minute limit ends after ~60-90 s).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.adapter import AdapterError, JobSpec, JobState, JobStatus, SchedulerJobRef, UsageRecord
from tests.contract.target import ContractTarget

CANARY = f"/tmp/aifa-contract-canary-{uuid.uuid4().hex}"
TOUCH = f"touch {CANARY}"

META_NAME = f"-x; {TOUCH} | cat & $({TOUCH}) `{TOUCH}` 'q' \"dq\""
META_ENV = {
    "AIFA_T_COMMA": "a,b,c=d,e",
    "AIFA_T_QUOTES": f"it's \"quoted\" $({TOUCH}) `{TOUCH}` ; | & \\ end",
    "AIFA_T_SPACES": "  lead, and trail  ",
}
META_LITERAL = "literal: ; | & $( ) ` \" \\ end"
META_HEREDOC = f"heredoc $({TOUCH}) `{TOUCH}` ; | & '\""
META_SCRIPT = f"""#!/bin/sh
# metacharacters in a comment: ; | & $({TOUCH}) `{TOUCH}` ' " \\
printf '%s\\n' '{META_LITERAL}'
printf '[%s]\\n' "$AIFA_T_COMMA"
printf '[%s]\\n' "$AIFA_T_QUOTES"
printf '[%s]\\n' "$AIFA_T_SPACES"
printf '[%s]\\n' "$SLURM_JOB_NAME"
cat <<'AIFA_END'
{META_HEREDOC}
AIFA_END
"""

SCRIPTS = {
    "ok": "#!/bin/sh\necho contract-ok\nsleep 2\nexit 0\n",
    "fail": "#!/bin/sh\necho failing >&2\nexit 3\n",
    "timeout": "#!/bin/sh\nsleep 600\n",
    "cancel": "#!/bin/sh\nsleep 600\n",
    "gpu": "#!/bin/sh\nsleep 2\n",
    "meta": META_SCRIPT,
}
START_STATES = {JobState.PENDING, JobState.RUNNING}


def _interval(target: ContractTarget) -> float:
    return max(0.05, min(2.0, target.settle_timeout / 100))


@dataclass
class Batch:
    """Every job of the suite, submitted together at module start."""

    target: ContractTarget
    since: datetime
    refs: dict[str, SchedulerJobRef] = field(default_factory=dict)
    specs: dict[str, JobSpec] = field(default_factory=dict)
    first: dict[str, JobStatus] = field(default_factory=dict)
    first_poll_calls: int | None = None
    finals: dict[str, JobStatus] = field(default_factory=dict)

    def submit(self, key: str, spec: JobSpec) -> None:
        self.specs[key] = spec
        self.refs[key] = self.target.adapter.submit(spec)

    def wait_final(self, key: str, timeout: float | None = None) -> JobStatus:
        """Poll ``key``'s job until a final status (cached once seen)."""
        if key in self.finals:
            return self.finals[key]
        limit = self.target.settle_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        last: JobStatus | None = None
        while time.monotonic() < deadline:
            for status in self.target.adapter.poll([self.refs[key]]):
                last = status
                if status.final:
                    self.finals[key] = status
                    return status
            time.sleep(_interval(self.target))
        raise AssertionError(f"job {key!r} not final after {limit:.0f}s (last: {last})")

    def wait_seen(self, key: str) -> JobStatus:
        """Poll until the scheduler reports ``key``'s job at all."""
        deadline = time.monotonic() + self.target.settle_timeout
        while time.monotonic() < deadline:
            statuses = self.target.adapter.poll([self.refs[key]])
            if statuses:
                return statuses[0]
            time.sleep(_interval(self.target))
        raise AssertionError(f"job {key!r} never reported by poll")


def _spec(target: ContractTarget, key: str, **kw: object) -> JobSpec:
    base = JobSpec(tag=uuid.uuid4().hex, username=target.username, account=target.account,
                   script=SCRIPTS[key], time_limit_minutes=10, name=f"contract-{key}",
                   partition=target.cpu_partition)
    return replace(base, **kw)  # type: ignore[arg-type]


def _submit_all(batch: Batch, target: ContractTarget) -> None:
    batch.submit("ok", _spec(target, "ok"))
    batch.submit("fail", _spec(target, "fail"))
    batch.submit("timeout", _spec(target, "timeout", time_limit_minutes=1))
    batch.submit("cancel", _spec(target, "cancel"))
    if target.gpu_partition is not None:
        batch.submit("gpu", _spec(target, "gpu", partition=target.gpu_partition,
                                  gpus_per_node=1))
    batch.submit("meta", _spec(target, "meta", name=META_NAME, environment=dict(META_ENV)))


def _first_poll(batch: Batch, target: ContractTarget) -> None:
    counter: Callable[[], int] | None = target.extra.get("scheduler_calls")  # type: ignore[assignment]
    before = counter() if counter else 0
    statuses = target.adapter.poll(list(batch.refs.values()))
    if counter:
        batch.first_poll_calls = counter() - before
    by_id = {s.job_id: s for s in statuses}
    batch.first = {k: by_id[r.job_id] for k, r in batch.refs.items() if r.job_id in by_id}


@pytest.fixture(scope="module")
def batch(target: ContractTarget) -> Iterator[Batch]:
    """Submit every job of the suite up front; cancel leftovers at the end."""
    made = Batch(target=target, since=datetime.now(UTC) - timedelta(minutes=5))
    try:
        _submit_all(made, target)
        _first_poll(made, target)
        yield made
    finally:
        for key, ref in made.refs.items():
            if key not in made.finals:
                with contextlib.suppress(AdapterError):
                    target.adapter.cancel(ref)


# ----------------------------------------------------------------------------- lifecycle


def test_poll_is_batched(batch: Batch) -> None:
    """One poll call with every ref returns one status per job."""
    assert len(batch.refs) >= 5
    assert set(batch.first) == set(batch.refs), "poll omitted freshly submitted jobs"
    assert {s.job_id for s in batch.first.values()} == {r.job_id for r in batch.refs.values()}
    if batch.first_poll_calls is not None:
        assert batch.first_poll_calls <= 2, f"{batch.first_poll_calls} scheduler calls"


def test_submit_runs_to_completed(batch: Batch) -> None:
    assert batch.first["ok"].state in START_STATES
    assert not batch.first["ok"].final
    status = batch.wait_final("ok")
    assert status.state is JobState.COMPLETED
    assert status.exit_code == 0
    assert status.elapsed_seconds is not None and status.elapsed_seconds >= 0
    assert status.alloc_tres.get("cpu", 0) >= 1


def test_failing_script_is_failed_with_exit_code(batch: Batch) -> None:
    status = batch.wait_final("fail")
    assert status.state is JobState.FAILED
    assert status.exit_code == 3


def test_time_limit_gives_timeout(batch: Batch, target: ContractTarget) -> None:
    wait = float(target.extra.get("timeout_wait", target.settle_timeout + 120))  # type: ignore[arg-type]
    status = batch.wait_final("timeout", timeout=wait)
    assert status.state is JobState.TIMEOUT


def test_cancel_gives_cancelled(batch: Batch, target: ContractTarget) -> None:
    assert batch.wait_seen("cancel").state in START_STATES
    target.adapter.cancel(batch.refs["cancel"])
    status = batch.wait_final("cancel")
    assert status.state is JobState.CANCELLED
    target.adapter.cancel(batch.refs["cancel"])  # again: no error


def test_cancel_of_finished_job_is_no_error(batch: Batch, target: ContractTarget) -> None:
    batch.wait_final("fail")
    target.adapter.cancel(batch.refs["fail"])
    (status,) = target.adapter.poll([batch.refs["fail"]])
    assert status.state is JobState.FAILED


def test_unknown_job_is_never_final(target: ContractTarget) -> None:
    ghost = SchedulerJobRef(job_id="987654321", username=target.username)
    assert not any(s.final for s in target.adapter.poll([ghost]))


def test_gpu_request_is_charged_for_gpus(batch: Batch, target: ContractTarget) -> None:
    if "gpu" not in batch.refs:
        pytest.skip("target has no gpu partition")
    status = batch.wait_final("gpu")
    assert status.state is JobState.COMPLETED
    assert status.alloc_tres.get("gres/gpu") == 1
    assert status.elapsed_seconds is not None and status.elapsed_seconds > 0


# ----------------------------------------------------------------------------- metacharacters


def _canary_exists(target: ContractTarget) -> bool:
    here = os.path.exists(CANARY)
    there = False
    if target.run_on_cluster is not None:
        out = target.run_on_cluster(["sh", "-c", f"test -e {CANARY} && echo yes || echo no"])
        there = "yes" in out
    return here or there


def test_metacharacters_reach_the_job_verbatim(batch: Batch, target: ContractTarget) -> None:
    status = batch.wait_final("meta")
    assert not _canary_exists(target), "something executed the job's strings as shell"
    assert status.state is JobState.COMPLETED, status
    try:
        out = target.adapter.read_output(batch.refs["meta"], "stdout")
    except AdapterError as exc:
        if exc.code == "output_unavailable":
            pytest.skip(f"adapter cannot read output: {exc}")
        raise
    lines = out.split("\n")
    assert lines[0] == META_LITERAL
    assert lines[1:4] == [f"[{META_ENV[k]}]" for k in ("AIFA_T_COMMA", "AIFA_T_QUOTES",
                                                          "AIFA_T_SPACES")]
    assert lines[4].startswith(f"[{META_NAME}") and lines[4].endswith("]")
    assert lines[5] == META_HEREDOC


# ----------------------------------------------------------------------------- lookup, accounting


def test_find_by_tag(batch: Batch, target: ContractTarget) -> None:
    tag = batch.specs["ok"].tag
    unknown = uuid.uuid4().hex
    found = target.adapter.find_by_tag([tag, unknown], since=batch.since)
    assert found[tag].job_id == batch.refs["ok"].job_id
    assert unknown not in found
    assert target.adapter.find_by_tag([unknown]) == {}
    # narrowed to the job's account (lower case, as the reconciler names it): still found
    narrowed = target.adapter.find_by_tag([tag], since=batch.since, accounts=[batch.specs["ok"].account.lower()])
    assert narrowed[tag].job_id == batch.refs["ok"].job_id


def _usage_of(batch: Batch, target: ContractTarget, keys: list[str]) -> tuple[dict[str, str], dict[str, UsageRecord]]:
    """The jobs ``keys`` once usage reports them all: (job id -> key, job id -> record)."""
    for key in keys:
        batch.wait_final(key)
    wanted = {batch.refs[k].job_id: k for k in keys}
    deadline = time.monotonic() + target.settle_timeout
    while True:
        found = target.adapter.usage(batch.since, accounts=[target.account])
        records = {r.job_id: r for r in found}
        if set(wanted) <= set(records) or time.monotonic() > deadline:
            break
        time.sleep(_interval(target))
    assert set(wanted) <= set(records), f"missing from usage: {set(wanted) - set(records)}"
    return wanted, records


def test_usage_includes_finished_jobs(batch: Batch, target: ContractTarget) -> None:
    keys = ["ok", "fail"] + (["gpu"] if "gpu" in batch.refs else [])
    wanted, records = _usage_of(batch, target, keys)
    for job_id, key in wanted.items():
        rec = records[job_id]
        assert (rec.account, rec.username) == (target.account, target.username)
        assert rec.state is batch.finals[key].state
        assert rec.elapsed_seconds >= 0 and rec.alloc_tres.get("cpu", 0) >= 1
    if "gpu" in wanted.values():
        gpu = records[batch.refs["gpu"].job_id]
        assert gpu.alloc_tres.get("gres/gpu") == 1 and gpu.elapsed_seconds > 0


def test_usage_until_excludes_jobs_ended_after_it(batch: Batch, target: ContractTarget) -> None:
    """``usage(since, until=...)``: the jobs that ended after ``since`` and not after
    ``until`` (the usage importer reads a busy accounting window in such pieces)."""
    # the time-limit job ends a minute after the others when the suite ran its test already
    keys = ["ok", "fail"] + [k for k in ("gpu", "timeout") if k in batch.finals]
    wanted, records = _usage_of(batch, target, keys)
    ends = {job_id: records[job_id].end_time for job_id in wanted}
    assert all(end is not None for end in ends.values())
    first, last = min(e for e in ends.values() if e), max(e for e in ends.values() if e)

    def bounded(until: datetime) -> set[str]:
        found = target.adapter.usage(batch.since, accounts=[target.account], until=until)
        assert all(r.end_time is not None and batch.since <= r.end_time <= until for r in found), found
        return {r.job_id for r in found} & set(wanted)

    assert bounded(first - timedelta(seconds=1)) == set(), "jobs that ended after until"
    assert bounded(first) == {j for j, e in ends.items() if e == first}
    assert bounded(last) == set(wanted)
    if last - first >= timedelta(seconds=2):
        middle = first + (last - first) / 2
        assert bounded(middle) == {j for j, e in ends.items() if e and e <= middle}


def test_iter_usage_gives_what_usage_gives(batch: Batch, target: ContractTarget) -> None:
    """``iter_usage`` (the importer's stream for a window too large for one answer):
    the records ``usage`` answers for the same window, in any order, each once."""
    keys = ["ok", "fail"] + [k for k in ("gpu", "timeout") if k in batch.finals]
    wanted, records = _usage_of(batch, target, keys)
    until = max(r.end_time for job_id, r in records.items() if job_id in wanted and r.end_time)
    listed = target.adapter.usage(batch.since, accounts=[target.account], until=until)
    streamed = list(target.adapter.iter_usage(batch.since, accounts=[target.account], until=until))
    assert sorted(streamed, key=lambda r: r.job_id) == sorted(listed, key=lambda r: r.job_id)
    assert set(wanted) <= {r.job_id for r in streamed} and len({r.job_id for r in streamed}) == len(streamed)


# ----------------------------------------------------------------------------- health, discovery


def test_health_ok_when_up(target: ContractTarget) -> None:
    health = target.adapter.health()
    assert health.ok, health.detail


def test_health_not_ok_when_unreachable(target: ContractTarget) -> None:
    adapter = target.unreachable()
    try:
        health = adapter.health()
    finally:
        adapter.close()
    assert not health.ok
    assert health.detail


def test_discover_partitions_and_tres(target: ContractTarget) -> None:
    parts = {p.name: p for p in target.adapter.discover()}
    for name in (target.cpu_partition, target.gpu_partition):
        if name is not None:
            assert name in parts, f"{name} not in {sorted(parts)}"
    for part in parts.values():
        assert part.cpus_per_node > 0 or part.tres.get("cpu", 0) > 0
    if target.gpu_partition is not None:
        gpu = parts[target.gpu_partition]
        assert gpu.gpus_per_node >= 1 or gpu.tres.get("gres/gpu", 0) >= 1
    assert sum(p.default for p in parts.values()) <= 1
