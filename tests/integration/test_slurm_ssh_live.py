"""slurm_ssh against the real dev Slurm clusters (``make slurm-up``): what the
shared contract suite does not cover — refusal codes, permissions, host-key
pinning, connection pooling under threads, output caps, outcome-unknown
submits, direct-sbatch jobs in usage, and timings (printed with ``-s``)."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from adapters.slurm_ssh import SlurmSSHAdapter
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    JobSpec,
    OutputTooLarge,
    SchedulerJobRef,
    SubmitOutcomeUnknown,
    SubmitRejected,
)
from broker.states import JobState
from tests.contract.factory_slurm_ssh import RELEASES, closed_port, load_connection

pytestmark = pytest.mark.slurm

SLEEP = "#!/bin/sh\nsleep 300\n"
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBf0Yx1mJ1m4vvZRWkVD6y0V4fBq0l4y6QyY0b3m5wZb"


@pytest.fixture(scope="module", params=RELEASES)
def connection(request: pytest.FixtureRequest) -> dict:
    release = request.param
    conn = load_connection(release)
    if conn is None:
        pytest.skip(
            f"Slurm {release} dev cluster not set up: run `make slurm-up SLURM_RELEASE={release}`"
        )
    probe = SlurmSSHAdapter("probe", conn, data_dir="/tmp")
    try:
        health = probe.health()
    finally:
        probe.close()
    if not health.ok:
        pytest.skip(f"Slurm {release} dev cluster not running ({health.detail})")
    return conn


@pytest.fixture
def adapter(connection: dict) -> Iterator[SlurmSSHAdapter]:
    made = SlurmSSHAdapter("live", connection, data_dir="/tmp")
    yield made
    made.close()


def spec(**kw: object) -> JobSpec:
    base: dict[str, object] = dict(
        tag=uuid.uuid4().hex,
        username="alice",
        account="proj-a",
        script="#!/bin/sh\ntrue\n",
        time_limit_minutes=5,
        name="live",
    )
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def wait_final(adapter: SlurmSSHAdapter, ref: SchedulerJobRef, timeout: float = 120) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for status in adapter.poll([ref]):
            if status.final:
                return status
        time.sleep(0.5)
    raise AssertionError(f"job {ref.job_id} not final")


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"account": "proj-b"}, "invalid_account"),
        ({"partition": "nope"}, "invalid_partition"),
        ({"account": "no-such-account"}, "invalid_account"),
    ],
)
def test_refusals_have_stable_codes(adapter: SlurmSSHAdapter, overrides: dict, code: str) -> None:
    with pytest.raises(SubmitRejected) as exc:
        adapter.submit(spec(**overrides))
    assert exc.value.code == code and not exc.value.transient


def test_cancel_of_someone_elses_job_is_refused(adapter: SlurmSSHAdapter) -> None:
    ref = adapter.submit(spec(script=SLEEP))
    try:
        with pytest.raises(SubmitRejected) as exc:
            adapter.cancel(SchedulerJobRef(job_id=ref.job_id, username="bob"))
        assert exc.value.code == "permission_denied"
    finally:
        adapter.cancel(ref)
    status = wait_final(adapter, ref)
    assert status.state is JobState.CANCELLED  # type: ignore[attr-defined]


def test_wrong_host_key_is_refused(connection: dict) -> None:
    bad = SlurmSSHAdapter("bad", {**connection, "host_key": OTHER_KEY}, data_dir="/tmp")
    try:
        health = bad.health()
        assert not health.ok and health.checks["tcp_connect"] == "ok"
        assert health.checks["host_key"] != "ok"
        with pytest.raises(AdapterConfigError) as exc:
            bad.submit(spec())
        assert exc.value.code == "host_key_mismatch"
        # the error shows the key the server offered (as `ssh-keygen -lf` prints it)
        real = base64.b64decode(connection["host_key"].split()[1])
        expected = "SHA256:" + base64.b64encode(hashlib.sha256(real).digest()).decode().rstrip("=")
        assert expected in str(exc.value) and expected in health.checks["host_key"]
    finally:
        bad.close()


def test_health_down_and_without_login(connection: dict) -> None:
    down = SlurmSSHAdapter("down", {**connection, "port": closed_port()}, data_dir="/tmp")
    health = down.health()
    assert not health.ok and health.checks["tcp_connect"].startswith("failed")
    with pytest.raises(AdapterError) as exc:
        down.poll([SchedulerJobRef(job_id="1", username="alice")])
    assert exc.value.transient
    anonymous = {k: v for k, v in connection.items() if k != "query_username"}
    partial = SlurmSSHAdapter("anon", anonymous, data_dir="/tmp").health()
    assert partial.checks == {"tcp_connect": "ok", "host_key": "ok"} and not partial.ok


def test_threads_share_one_connection_and_poll_is_batched(adapter: SlurmSSHAdapter) -> None:
    n = 32
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        refs = list(pool.map(lambda _: adapter.submit(spec(script=SLEEP)), range(n)))
    submit_seconds = time.monotonic() - started
    try:
        assert len({r.job_id for r in refs}) == n
        assert adapter._pool.connection_count() <= 2  # alice (+ the query user)
        before = adapter.scheduler_calls()
        started = time.monotonic()
        statuses = adapter.poll(refs)
        poll_ms = (time.monotonic() - started) * 1000
        assert adapter.scheduler_calls() - before <= 2
        assert {s.job_id for s in statuses} == {r.job_id for r in refs}
        print(
            f"\n{n} threaded submits: {submit_seconds:.2f}s ({n / submit_seconds:.0f}/s); "
            f"poll of {n}: {poll_ms:.0f} ms"
        )
    finally:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(adapter.cancel, refs))
    started = time.monotonic()
    deadline = started + 60
    while time.monotonic() < deadline:
        statuses = adapter.poll(refs)
        if len(statuses) == n and all(s.final for s in statuses):
            break
        time.sleep(0.5)
    before = adapter.scheduler_calls()
    started = time.monotonic()
    statuses = adapter.poll(refs)
    print(
        f"poll of {n} finished jobs (squeue + sacct): {(time.monotonic() - started) * 1000:.0f} ms"
    )
    assert adapter.scheduler_calls() - before == 2
    assert all(s.final and s.state is JobState.CANCELLED for s in statuses)


def test_submit_latency(adapter: SlurmSSHAdapter) -> None:
    adapter.health()
    refs, times = [], []
    for _ in range(10):
        started = time.monotonic()
        refs.append(adapter.submit(spec()))
        times.append((time.monotonic() - started) * 1000)
    times.sort()
    print(
        f"\nsubmit latency on a warm connection: median {times[5]:.1f} ms, max {times[-1]:.1f} ms "
        f"(first {times[0]:.1f})"
    )
    for ref in refs:
        wait_final(adapter, ref)


def test_timeout_after_sending_is_outcome_unknown(adapter: SlurmSSHAdapter) -> None:
    """A command that outlives its timeout once sent: unknown outcome for a
    submit (``idempotent=False``, what ``submit`` uses), transient otherwise."""
    with pytest.raises(SubmitOutcomeUnknown):
        adapter._pool.run("alice", "sleep 2", timeout=0.3, idempotent=False)
    with pytest.raises(AdapterError) as exc:
        adapter._pool.run("alice", "sleep 2", timeout=0.3)
    assert exc.value.transient and not isinstance(exc.value, SubmitOutcomeUnknown)
    assert exc.value.code == "command_timeout"  # the usage importer halves its window once on this
    assert adapter._pool.run("alice", "echo ok").stdout == "ok\n"


def test_output_cap(connection: dict) -> None:
    capped = SlurmSSHAdapter("capped", {**connection, "max_output_bytes": 1024}, data_dir="/tmp")
    try:
        with pytest.raises(OutputTooLarge) as exc:
            capped._pool.run("alice", "head -c 100000 /dev/zero")
        assert exc.value.code == "output_too_large"  # the usage importer splits its window on this
        assert capped._pool.run("alice", "echo still fine").stdout == "still fine\n"
    finally:
        capped.close()


def test_a_stream_is_read_line_by_line_past_the_output_cap(connection: dict) -> None:
    """``stream_lines`` (usage import of one account's over-cap window): the whole
    output, in order, though far past ``max_output_bytes``; one line past the cap is
    ``OutputTooLarge``; a failure is raised after the lines; a stream closed early
    frees its channel (one channel per connection here)."""
    capped = SlurmSSHAdapter("capped", {**connection, "max_output_bytes": 1024, "max_channels_per_connection": 1},
                             data_dir="/tmp")

    def failure(status: int, stderr: str) -> AdapterError:
        return AdapterError(f"exit {status}: {stderr.strip()}", code="scheduler_error")

    try:
        lines = list(capped._pool.stream_lines("alice", "seq 1 200000", failure=failure))
        assert lines == [str(i) for i in range(1, 200_001)]  # 1.3 MB through a 1 KiB cap
        with pytest.raises(OutputTooLarge):
            list(capped._pool.stream_lines("alice", "head -c 5000 /dev/zero", failure=failure))
        seen: list[str] = []
        with pytest.raises(AdapterError) as exc:
            seen.extend(capped._pool.stream_lines("alice", "echo one; echo two; echo bad >&2; exit 3",
                                                  failure=failure))
        assert seen == ["one", "two"] and str(exc.value) == "exit 3: bad"
        early = capped._pool.stream_lines("alice", "seq 1 10000000", failure=failure)
        assert next(early) == "1"
        early.close()
        assert capped._pool.run("alice", "echo still fine").stdout == "still fine\n"
    finally:
        capped.close()


def test_idle_connections_are_closed(connection: dict) -> None:
    quick = SlurmSSHAdapter("quick", {**connection, "pool_idle_seconds": 1}, data_dir="/tmp")
    try:
        quick._pool.run("alice", "true")
        assert quick._pool.connection_count() == 1
        time.sleep(3)
        assert quick._pool.connection_count() == 0
        assert quick._pool.run("alice", "true").ok
    finally:
        quick.close()


def test_pooled_connection_runs_aes_gcm(adapter: SlurmSSHAdapter) -> None:
    """The dev sshd (OpenSSH defaults) offers AES-GCM, so the pooled connection uses it,
    not paramiko's default first choice aes128-ctr + an HMAC checked in Python."""
    assert adapter._pool.run("alice", "true").ok
    (conn,) = adapter._pool._conns.values()
    transport = conn.client.get_transport()
    assert transport is not None
    assert (transport.local_cipher, transport.remote_cipher) == ("aes128-gcm@openssh.com",) * 2


def test_large_output_is_drained_without_deadlock(adapter: SlurmSSHAdapter) -> None:
    result = adapter._pool.run("alice", "head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2")
    assert len(result.stdout) == 3_000_000 and len(result.stderr) == 3_000_000


def test_direct_sbatch_jobs_are_in_usage(adapter: SlurmSSHAdapter) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    direct = adapter._pool.run("bob", "sbatch --parsable -A proj-b -J direct-live --wrap 'sleep 1'")
    assert direct.ok, direct.stderr
    job_id = direct.stdout.strip()
    wait_final(adapter, SchedulerJobRef(job_id=job_id, username="bob"))
    records = {r.job_id: r for r in adapter.usage(since, accounts=["proj-b"])}
    rec = records[job_id]
    assert rec.username == "bob" and rec.account == "proj-b" and rec.tag is None
    assert rec.state is JobState.COMPLETED and rec.elapsed_seconds >= 1


def test_gpu_job_and_output(adapter: SlurmSSHAdapter) -> None:
    script = "#!/bin/sh\necho gpus=$CUDA_VISIBLE_DEVICES\necho to-stderr >&2\n"
    ref = adapter.submit(
        spec(
            partition="gpu",
            gpus_per_node=2,
            script=script,
            memory_per_node_mb=200,
            environment={"COMMA": "x,y"},
        )
    )
    status = wait_final(adapter, ref)
    assert status.state is JobState.COMPLETED  # type: ignore[attr-defined]
    assert status.alloc_tres["gres/gpu"] == 2 and status.alloc_tres["mem"] == 200  # type: ignore[attr-defined]
    assert adapter.read_output(ref, "stdout").startswith("gpus=")
    assert adapter.read_output(ref, "stderr") == "to-stderr\n"
    assert len(adapter.read_output(ref, "stdout", tail=3)) == 3


def test_concurrent_channels_respect_the_cap(connection: dict) -> None:
    narrow = SlurmSSHAdapter(
        "narrow", {**connection, "max_channels_per_connection": 2}, data_dir="/tmp"
    )

    def job(_: int) -> None:
        narrow._pool.run("alice", "sleep 0.3")

    try:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(job, range(6)))
        elapsed = time.monotonic() - started
        assert elapsed >= 0.85, "6 x 0.3 s through 2 channels takes >= 0.9 s"
        assert narrow._pool.connection_count() == 1
    finally:
        narrow.close()
