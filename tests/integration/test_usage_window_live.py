"""The end of a usage-import window is bounded by the scheduler itself, not only
filtered afterwards by the adapter: with end states given, ``sacct --endtime`` and
slurmdb's ``end_time`` select by *end* time, so a job that was already running
inside the window but ended after it is not in the answer. That is what keeps the
answer for one slice of a busy window small (broker/usage_import.py). Checked on
every dev release and, for slurmrestd, every data-parser version it serves.

(The contract suite checks ``usage(since, until=...)`` itself; the adapters widen
a recent ``until`` by a clock margin and filter exactly, so these read one level
lower, with the bound the adapters put in the query.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from adapters.slurm_common.states import ACCOUNTING_END_STATES
from adapters.slurm_rest import SlurmRestAdapter
from adapters.slurm_rest.model import AccountingQuery
from adapters.slurm_ssh import SlurmSSHAdapter, commands, parse
from tests.contract.factory_slurm_rest import load_settings
from tests.support import slurm

SERVED = {"22.05": ("v0.0.38",), "24.11": ("v0.0.40", "v0.0.41", "v0.0.42"),
          "26.05": ("v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45")}
#: the job runs this long: it is running inside a window that ends before its end
RUN_SECONDS = 5

EndedJob = Callable[[str], tuple[str, int]]


@pytest.fixture(scope="module")
def ended_job() -> Iterator[EndedJob]:
    """Per release, one direct job of alice's (``proj-a``) that ran RUN_SECONDS and ended
    a few seconds ago: (job id, end as epoch seconds)."""
    made: dict[str, tuple[str, int]] = {}

    def get(release: str) -> tuple[str, int]:
        if release not in made:
            slurm.require_cluster(release)
            out = slurm.run_in(release, "sbatch", "--parsable", "--uid=alice", "--account=proj-a",
                               "--partition=cpu", "--time=2", f"--wrap=sleep {RUN_SECONDS}", "-o", "/dev/null")
            job = out.strip().split(";")[0]
            deadline = time.monotonic() + 120
            while True:
                line = slurm.run_in(release, "env", "SLURM_TIME_FORMAT=%s", "sacct", "-X", "-n", "-P", "-j", job,
                                    "-o", "State,Start,End").strip()
                state, start, end = ([*line.split("|"), "", "", ""])[:3]
                if state == "COMPLETED" and end.isdigit():
                    break
                assert time.monotonic() < deadline, f"job {job} not accounted: {line!r}"
                time.sleep(1)
            assert int(end) - int(start) >= RUN_SECONDS - 1
            made[release] = (job, int(end))
        job, end = made[release]
        time.sleep(max(0.0, end + 6 - time.time()))  # the included bound below must lie after the end
        return job, end

    yield get


def _bounds(end: int) -> tuple[int, int]:
    """(seconds ago a window ending 2 s before ``end`` ends, one ending after it):
    relative, as the adapters send them; slurmdbd reads "now" a moment later than us."""
    ago = time.time() - end
    return int(ago) + 2, max(1, int(ago) - 3)


@pytest.mark.slurm
@pytest.mark.parametrize("release", slurm.RELEASES)
def test_sacct_endtime_with_end_states_bounds_by_end_time(release: str, ended_job: EndedJob) -> None:
    job, end = ended_job(release)
    adapter = SlurmSSHAdapter(f"w-{release}", slurm.definition(release, "slurm_ssh")["connection"], data_dir="/tmp")
    try:
        fields = adapter._usage_fields("alice")

        def ids(until_back: int) -> set[str]:
            command = commands.build_sacct_window(3600, accounts=["proj-a"], terminal_only=True, fields=fields,
                                                  until_seconds_back=until_back)
            jobs, _ = parse.parse_sacct_parsable(adapter._query("alice", command, "sacct"), fields)
            return {j.job_id for j in jobs}

        before, after = _bounds(end)
        assert job not in ids(before), "a job running in the window but ended after it"
        assert job in ids(after)
    finally:
        adapter.close()


@pytest.mark.slurm
@pytest.mark.parametrize(("release", "version"), [(r, v) for r, vs in SERVED.items() for v in vs],
                         ids=[f"{r}-{v}" for r, vs in SERVED.items() for v in vs])
def test_slurmdb_end_time_with_end_states_bounds_by_end_time(release: str, version: str,
                                                             ended_job: EndedJob) -> None:
    job, end = ended_job(release)
    adapter = SlurmRestAdapter(f"w-{release}", {**load_settings(release), "api_version": version}, data_dir="/tmp")
    try:
        layer = adapter.api("alice")
        assert layer.version == version

        def ids(until_back: int) -> set[str]:
            query = AccountingQuery(lookback_seconds=3600, accounts=["proj-a"], states=ACCOUNTING_END_STATES,
                                    until_seconds=until_back)
            return {j.job_id for j in adapter._accounting_jobs(layer, "alice", query)}

        before, after = _bounds(end)
        assert job not in ids(before), "a job running in the window but ended after it"
        assert job in ids(after)
    finally:
        adapter.close()
