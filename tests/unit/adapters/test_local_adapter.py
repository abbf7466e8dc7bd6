"""Local adapter behaviour the contract suite does not cover."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters import local_supervisor as sup
from adapters.local import LocalAdapter
from broker.adapter import (
    AdapterConfigError,
    AdapterError,
    JobSpec,
    JobState,
    JobStatus,
    SchedulerJobRef,
    SubmitRejected,
)

Make = Callable[..., LocalAdapter]

FAST = {"time_scale": 1, "kill_grace_seconds": 0.5}


def spec(script: str, *, tag: str = "t", minutes: int = 30, **kw: object) -> JobSpec:
    """A job spec for user alice on account proj-a."""
    return JobSpec(tag=tag, username="alice", account="proj-a", script=script,
                   time_limit_minutes=minutes, **kw)  # type: ignore[arg-type]


def wait_final(adapter: LocalAdapter, ref: SchedulerJobRef, timeout: float = 20) -> JobStatus:
    """Poll until the job is final."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (status,) = adapter.poll([ref])
        if status.final:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {ref.job_id} not final after {timeout}s")


@pytest.fixture
def make_adapter(tmp_path: Path) -> Iterator[Callable[..., LocalAdapter]]:
    """Builds LocalAdapters on one data dir; cancels every job left running at teardown."""
    made: list[LocalAdapter] = []

    def make(**settings: object) -> LocalAdapter:
        adapter = LocalAdapter("local", {**FAST, **settings}, data_dir=str(tmp_path))
        made.append(adapter)
        return adapter

    yield make
    if made:
        reaper = made[0]
        every = [SchedulerJobRef(job_id=j, username="alice") for j in reaper._job_ids()]
        refs = [r for r in every if reaper.poll([r])]  # allocated-only dirs have no job
        for ref in refs:
            reaper.cancel(ref)
        for ref in refs:
            wait_final(reaper, ref)


def wait_running(adapter: LocalAdapter, ref: SchedulerJobRef) -> None:
    deadline = time.monotonic() + 10
    while adapter.poll([ref])[0].state is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_new_instance_finds_running_job_and_its_end(make_adapter: Make) -> None:
    first = make_adapter()
    ref = first.submit(spec("sleep 1.5; echo done", tag="survivor"))
    first.close()
    del first
    second = make_adapter()
    (status,) = second.poll([ref])
    assert status.state is JobState.RUNNING and not status.final
    assert second.find_by_tag(["survivor"])["survivor"].job_id == ref.job_id
    final = wait_final(second, ref)
    assert final.state is JobState.COMPLETED and final.exit_code == 0
    assert second.read_output(ref) == "done\n"


def test_vanished_supervisor_fails_job_and_kills_it(make_adapter: Make) -> None:
    adapter = make_adapter()
    ref = adapter.submit(spec("sleep 600"))
    wait_running(adapter, ref)
    state = sup.read_json(Path(adapter.data_dir) / "local-jobs" / ref.job_id / sup.STATE_FILE)
    assert state is not None
    os.kill(state["supervisor_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while sup.same_process_alive(state["supervisor_pid"], state["supervisor_start"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status = wait_final(adapter, ref)
    assert (status.state, status.raw_state) == (JobState.FAILED, "NODE_FAIL")
    time.sleep(0.1)
    assert not sup.same_process_alive(state["pid"], state["pid_start"])


def _state_of(adapter: LocalAdapter, ref: SchedulerJobRef) -> dict[str, object]:
    state = sup.read_json(Path(adapter.data_dir) / "local-jobs" / ref.job_id / sup.STATE_FILE)
    assert state is not None
    return state


def test_one_supervisor_runs_every_job_and_cancels_only_one(make_adapter: Make) -> None:
    adapter = make_adapter()
    refs = [adapter.submit(spec("sleep 30", tag=f"s{i}")) for i in range(3)]
    for ref in refs:
        wait_running(adapter, ref)
    supervisors = {_state_of(adapter, r)["supervisor_pid"] for r in refs}
    assert len(supervisors) == 1  # no process per job besides the job itself
    adapter.cancel(refs[0])
    assert wait_final(adapter, refs[0]).state is JobState.CANCELLED
    assert [s.state for s in adapter.poll(refs[1:])] == [JobState.RUNNING, JobState.RUNNING]


def test_a_new_supervisor_starts_after_the_old_one_vanished(make_adapter: Make) -> None:
    adapter = make_adapter()
    old = adapter.submit(spec("sleep 30", tag="old"))
    wait_running(adapter, old)
    old_state = _state_of(adapter, old)
    os.kill(int(old_state["supervisor_pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    assert wait_final(adapter, old).raw_state == "NODE_FAIL"
    new = adapter.submit(spec("echo again", tag="new"))
    assert wait_final(adapter, new).state is JobState.COMPLETED
    assert _state_of(adapter, new)["supervisor_pid"] != old_state["supervisor_pid"]
    assert adapter.read_output(new) == "again\n"


def test_idle_supervisor_exits_and_comes_back(make_adapter: Make) -> None:
    adapter = make_adapter(supervisor_idle_seconds=0.3)
    first = adapter.submit(spec("true", tag="a"))
    wait_final(adapter, first)
    pid = int(_state_of(adapter, first)["supervisor_pid"])  # type: ignore[call-overload]
    deadline = time.monotonic() + 10
    while sup.process_start_ticks(pid) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = adapter.submit(spec("echo back", tag="b"))
    assert wait_final(adapter, second).state is JobState.COMPLETED


def test_cancel_finished_job_is_no_error(make_adapter: Make) -> None:
    adapter = make_adapter()
    ref = adapter.submit(spec("true"))
    assert wait_final(adapter, ref).state is JobState.COMPLETED
    adapter.cancel(ref)
    assert wait_final(adapter, ref).state is JobState.COMPLETED


def test_cancel_unknown_job_raises_not_found(make_adapter: Make) -> None:
    with pytest.raises(AdapterError) as err:
        make_adapter().cancel(SchedulerJobRef(job_id="999", username="alice"))
    assert err.value.code == "not_found"


def test_job_ids_unique_across_threads_and_instances(make_adapter: Make) -> None:
    adapters = [make_adapter(), make_adapter()]
    ids: list[str] = []
    lock = threading.Lock()

    def allocate(adapter: LocalAdapter) -> None:
        adapter._root.mkdir(parents=True, exist_ok=True)
        for _ in range(25):
            job_id, _dir = adapter._new_job_dir()
            with lock:
                ids.append(job_id)

    threads = [threading.Thread(target=allocate, args=(adapters[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 200 and len(set(ids)) == 200
    assert sorted(map(int, ids)) == list(range(1, 201))


def test_submits_from_threads_get_distinct_jobs(make_adapter: Make) -> None:
    adapter = make_adapter()
    refs: list[SchedulerJobRef] = []

    def submit(i: int) -> None:
        refs.append(adapter.submit(spec(f"echo {i}", tag=f"tag{i}")))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.job_id for r in refs}) == 6
    for ref in refs:
        wait_final(adapter, ref)
        assert adapter.read_output(ref) == f"{ref.tag.removeprefix('tag')}\n"  # type: ignore[union-attr]


def test_broker_secrets_do_not_leak_into_jobs(make_adapter: Make,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFA_BROKER_DATABASE_URL", "postgresql://secret")
    adapter = make_adapter()
    ref = adapter.submit(spec("env", environment={"MINE": "x"}))
    wait_final(adapter, ref)
    out = adapter.read_output(ref)
    assert "postgresql://" not in out and "MINE=x" in out and "SLURM_JOB_USER=alice" in out


def test_user_cannot_override_slurm_variables(make_adapter: Make) -> None:
    adapter = make_adapter()
    ref = adapter.submit(spec('printf %s "$SLURM_JOB_ID"', environment={"SLURM_JOB_ID": "1"},
                              tag="x"))
    wait_final(adapter, ref)
    assert adapter.read_output(ref) == ref.job_id


def test_working_directory(make_adapter: Make, tmp_path: Path) -> None:
    adapter = make_adapter()
    wd = tmp_path / "wd"
    wd.mkdir()
    here = adapter.submit(spec("pwd", working_directory=str(wd)))
    missing = adapter.submit(spec("pwd", working_directory=str(tmp_path / "nope")))
    wait_final(adapter, here)
    wait_final(adapter, missing)
    assert adapter.read_output(here) == f"{wd}\n"
    assert adapter.read_output(missing) == f"{tmp_path}/local-jobs/{missing.job_id}\n"


def test_background_children_die_with_the_job(make_adapter: Make, tmp_path: Path) -> None:
    adapter = make_adapter()
    pidfile = tmp_path / "bg.pid"
    ref = adapter.submit(spec(f"sleep 600 &\necho $! > {pidfile}\n"))
    assert wait_final(adapter, ref).state is JobState.COMPLETED
    _wait_gone(int(pidfile.read_text()))


def _wait_gone(pid: int) -> None:
    """``pid`` dies within 5 s: the supervisor SIGKILLs the job's group before it records
    the end, but a signal's delivery is asynchronous (a loaded machine may run the dying
    process after the end is already recorded)."""
    deadline = time.monotonic() + 5
    while sup.process_start_ticks(pid) is not None:
        assert time.monotonic() < deadline, f"process {pid} of the job is still alive"
        time.sleep(0.02)


def test_cancel_kills_whole_process_tree(make_adapter: Make, tmp_path: Path) -> None:
    adapter = make_adapter()
    pidfile = tmp_path / "child.pid"
    ref = adapter.submit(spec(f"sh -c 'sleep 600' &\necho $! > {pidfile}\nwait\n"))
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    adapter.cancel(ref)
    status = wait_final(adapter, ref)
    assert status.state is JobState.CANCELLED
    _wait_gone(int(pidfile.read_text()))


def test_bad_interpreter_fails_the_job(make_adapter: Make) -> None:
    adapter = make_adapter()
    ref = adapter.submit(spec("#!/nonexistent/interpreter\n"))
    status = wait_final(adapter, ref)
    assert status.state is JobState.FAILED and status.exit_code == 127
    assert "cannot start" in adapter.read_output(ref, "stderr")


def test_output_tail(make_adapter: Make) -> None:
    adapter = make_adapter()
    ref = adapter.submit(spec("printf 0123456789; printf err >&2"))
    wait_final(adapter, ref)
    assert adapter.read_output(ref, "stdout", tail=4) == "6789"
    assert adapter.read_output(ref, "stderr") == "err"
    with pytest.raises(ValueError):
        adapter.read_output(ref, "../spec.json")


@pytest.mark.parametrize(("kw", "code"), [
    ({"partition": "nope"}, "invalid_partition"),
    ({"gpus_per_node": 1}, "invalid_request"),
    ({"cpus_per_task": 10_000}, "invalid_request"),
    ({"environment": {"BAD-NAME": "x"}}, "invalid_environment"),
    ({"minutes": 100}, "invalid_time_limit"),
])
def test_rejections(make_adapter: Make, kw: dict[str, object], code: str) -> None:
    adapter = make_adapter(max_time_minutes=60)
    with pytest.raises(SubmitRejected) as err:
        adapter.submit(spec("true", **kw))  # type: ignore[arg-type]
    assert err.value.code == code
    assert not list(adapter._job_ids())


def test_limits_can_be_off(make_adapter: Make) -> None:
    adapter = make_adapter(enforce_limits=False)
    ref = adapter.submit(spec("true", cpus_per_task=10_000, gpus_per_node=8))
    status = wait_final(adapter, ref)
    assert status.alloc_tres["cpu"] == 10_000 and status.alloc_tres["gres/gpu"] == 8


@pytest.mark.parametrize("settings", [
    {"partitions": []},
    {"partitions": [{"cpus": 2}]},
    {"partitions": [{"name": "a"}, {"name": "a"}]},
    {"partitions": [{"name": "a", "cpus": "many"}]},
    {"time_scale": 0},
])
def test_bad_settings(tmp_path: Path, settings: dict[str, object]) -> None:
    with pytest.raises(AdapterConfigError):
        LocalAdapter("local", settings, data_dir=str(tmp_path))


def test_construction_touches_nothing(tmp_path: Path) -> None:
    LocalAdapter("local", {}, data_dir=str(tmp_path / "later"))
    assert not (tmp_path / "later").exists()


def test_default_partition_from_machine(tmp_path: Path) -> None:
    (part,) = LocalAdapter("local", {"gpus": 2}, data_dir=str(tmp_path)).discover()
    assert part.name == "local" and part.default
    assert part.cpus_per_node == os.cpu_count() and part.gpus_per_node == 2
    assert part.memory_per_node_mb > 0 and part.tres["gres/gpu"] == 2
