"""The slurm_rest adapter against the real dev clusters (``make slurm-up``).

One module-scoped batch per release submits every job up front (so the
time-limit job runs alongside the others), then each test waits for its job.
Output files are read straight from the dev cluster's file system (the host's
for 22.05, the chroot's for 24.11/26.05): slurmrestd itself cannot read them.
Timings of each operation are printed at the end (``pytest -s``).
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from adapters.slurm_rest import SlurmRestAdapter
from broker.adapter import JobSpec, JobState, JobStatus, SchedulerJobRef, SubmitRejected
from tests.contract.factory_slurm_rest import RELEASES, UNREACHABLE_URL, definition_path, load_settings

pytestmark = pytest.mark.slurm

T = TypeVar("T")
CANARY = f"/tmp/aifa-rest-canary-{uuid.uuid4().hex}"
META_ENV = {
    "AIFA_Q": f'it\'s "q" $(touch {CANARY}) `touch {CANARY}` ; | & \\ end',
    "AIFA_C": "a,b,c=d,e",
    "AIFA_S": "  lead and trail  ",
}
META_SCRIPT = f"""#!/bin/sh
# ; | & $(touch {CANARY}) `touch {CANARY}`
printf '%s\\n' 'lit: ; | & $( ) ` " \\ end'
printf '[%s]\\n' "$AIFA_Q" "$AIFA_C" "$AIFA_S"
"""
SCRIPTS = {
    "ok": "#!/bin/sh\necho ok\nsleep 2\n",
    "fail": "#!/bin/sh\nexit 3\n",
    "cancel": "#!/bin/sh\nsleep 600\n",
    "gpu": '#!/bin/sh\necho "gpus=$CUDA_VISIBLE_DEVICES"\nsleep 2\n',
    "meta": META_SCRIPT,
}


@dataclass
class Live:
    release: str
    adapter: SlurmRestAdapter
    root: Path
    since: datetime
    refs: dict[str, SchedulerJobRef] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    finals: dict[str, JobStatus] = field(default_factory=dict)
    timings: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def timed(self, name: str, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.timings[name].append((time.perf_counter() - started) * 1000)

    def wait_final(self, key: str, timeout: float = 90.0) -> JobStatus:
        if key in self.finals:
            return self.finals[key]
        deadline = time.monotonic() + timeout
        last: list[JobStatus] = []
        while time.monotonic() < deadline:
            last = self.timed("poll(1)", lambda: self.adapter.poll([self.refs[key]]))
            if last and last[0].final:
                self.finals[key] = last[0]
                return last[0]
            time.sleep(1)
        raise AssertionError(f"{self.release} {key}: not final after {timeout}s: {last}")

    def output(self, key: str) -> str:
        ref = self.refs[key]
        return (self.root / "home" / ref.username / f"slurm-{ref.job_id}.out").read_text()


def _info(release: str) -> dict[str, Any]:
    path = definition_path(release).with_name("info.json")
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture(scope="module", params=RELEASES, ids=lambda r: f"slurm_rest-{r}")
def live(request: pytest.FixtureRequest) -> Iterator[Live]:
    release: str = request.param
    if not definition_path(release).exists():
        pytest.skip(f"no generated slurm_rest.toml for {release} (make slurm-up SLURM_RELEASE={release})")
    adapter = SlurmRestAdapter(f"live{release}", load_settings(release), data_dir="/tmp")
    health = adapter.health()
    if not health.ok:
        adapter.close()
        pytest.skip(f"{release} not healthy: {health.detail}")
    made = Live(release, adapter, Path(_info(release).get("root", "/")), datetime.now(UTC) - timedelta(minutes=2))
    try:
        for key, script in SCRIPTS.items():
            spec = JobSpec(
                tag=uuid.uuid4().hex,
                username="alice",
                account="proj-a",
                script=script,
                time_limit_minutes=10,
                name=f"live-{key}",
                partition="gpu" if key == "gpu" else "cpu",
                gpus_per_node=1 if key == "gpu" else 0,
                environment=META_ENV if key == "meta" else {},
            )
            made.tags[key] = spec.tag
            made.refs[key] = made.timed("submit", lambda s=spec: adapter.submit(s))
        yield made
    finally:
        for key, ref in made.refs.items():
            if key not in made.finals:
                adapter.cancel(ref)
        _print_timings(made)
        adapter.close()


def _print_timings(made: Live) -> None:
    version = made.adapter.discovery.version if made.adapter.discovery else "?"
    print(f"\nslurm_rest {made.release} ({version}) timings, ms:")
    for name, values in sorted(made.timings.items()):
        print(f"  {name:<22} n={len(values):<3} median={statistics.median(values):8.1f} max={max(values):8.1f}")


def test_batched_poll(live: Live) -> None:
    refs = list(live.refs.values())
    before = live.adapter.request_count
    statuses = live.timed(f"poll({len(refs)})", lambda: live.adapter.poll(refs))
    assert live.adapter.request_count - before <= 2
    assert {s.job_id for s in statuses} == {r.job_id for r in refs}


def test_completed_with_charge_data(live: Live) -> None:
    status = live.wait_final("ok")
    assert status.state is JobState.COMPLETED and status.exit_code == 0
    assert status.elapsed_seconds is not None and status.elapsed_seconds >= 1
    assert status.alloc_tres["cpu"] >= 1 and status.alloc_tres["mem"] > 0 and status.alloc_tres["node"] == 1
    assert status.tag == live.tags["ok"]
    assert live.output("ok") == "ok\n"


def test_gpu_job_gets_and_is_charged_a_gpu(live: Live) -> None:
    status = live.wait_final("gpu")
    assert status.state is JobState.COMPLETED
    assert status.alloc_tres.get("gres/gpu") == 1
    assert live.output("gpu").startswith("gpus=") and live.output("gpu").strip() != "gpus="


def test_failing_job(live: Live) -> None:
    status = live.wait_final("fail")
    assert status.state is JobState.FAILED and status.exit_code == 3


def test_cancel(live: Live) -> None:
    live.timed("cancel", lambda: live.adapter.cancel(live.refs["cancel"]))
    status = live.wait_final("cancel")
    assert status.state is JobState.CANCELLED
    live.adapter.cancel(live.refs["cancel"])


def test_metacharacters_intact(live: Live) -> None:
    assert live.wait_final("meta").state is JobState.COMPLETED
    lines = live.output("meta").splitlines()
    assert lines[0] == 'lit: ; | & $( ) ` " \\ end'
    assert lines[1:] == [f"[{META_ENV[k]}]" for k in ("AIFA_Q", "AIFA_C", "AIFA_S")]
    assert not Path(CANARY).exists() and not (live.root / CANARY.lstrip("/")).exists()


def test_find_by_tag(live: Live) -> None:
    live.wait_final("ok")
    unknown = uuid.uuid4().hex
    found = live.timed(
        "find_by_tag",
        lambda: live.adapter.find_by_tag([live.tags["ok"], live.tags["cancel"], unknown], since=live.since),
    )
    assert found[live.tags["ok"]].job_id == live.refs["ok"].job_id
    assert found[live.tags["cancel"]].job_id == live.refs["cancel"].job_id
    assert unknown not in found


def test_usage(live: Live) -> None:
    for key in ("ok", "fail", "gpu"):
        live.wait_final(key)
    records = {r.job_id: r for r in live.timed("usage", lambda: live.adapter.usage(live.since, accounts=["proj-a"]))}
    for key in ("ok", "fail", "gpu"):
        rec = records[live.refs[key].job_id]
        assert (rec.account, rec.username, rec.tag) == ("proj-a", "alice", live.tags[key])
        assert rec.state is live.finals[key].state and rec.alloc_tres["cpu"] >= 1
    assert records[live.refs["gpu"].job_id].alloc_tres["gres/gpu"] == 1
    assert all(r.account == "proj-a" for r in records.values())


def test_rejections(live: Live) -> None:
    spec = JobSpec(
        tag=uuid.uuid4().hex, username="alice", account="proj-b", script="#!/bin/sh\ntrue\n", time_limit_minutes=1
    )
    with pytest.raises(SubmitRejected) as info:
        live.adapter.submit(spec)
    assert info.value.code == "invalid_account" and not info.value.transient
    with pytest.raises(SubmitRejected) as info:
        live.adapter.submit(JobSpec(**{**spec.__dict__, "account": "proj-a", "partition": "nope"}))
    assert info.value.code == "invalid_partition"


def test_health(live: Live) -> None:
    health = live.timed("health", live.adapter.health)
    assert health.ok, health.detail
    down = SlurmRestAdapter("down", {**load_settings(live.release), "url": UNREACHABLE_URL}, data_dir="/tmp")
    try:
        bad = down.health()
    finally:
        down.close()
    assert not bad.ok and "cluster_unavailable" in bad.detail


def test_discover(live: Live) -> None:
    parts = {p.name: p for p in live.timed("discover", live.adapter.discover)}
    assert {"cpu", "gpu"} <= set(parts)
    assert parts["gpu"].gpus_per_node == 4 and parts["cpu"].cpus_per_node > 0
