"""A burst of direct jobs too large for one accounting answer, against the real
scheduler of each dev release: the usage import reads it in pieces and charges
every job exactly once instead of stopping at it ("usage import stuck").

The first burst is two accounts' jobs ending in the same second, so no window can be
narrow enough for all of them; the adapter's answer cap is set (from the sizes
slurmrestd really answers) between one account's share and the whole burst. The
second is one account's, with the cap at half its answer: no window and no account
split is small enough, and the import streams the window (``iter_usage``) through
``slurm_rest`` and ``slurm_ssh`` alike. The accounts are the test's own, so
leftover accounting of other tests or benchmarks in the shared ``proj-a``/``proj-b``
cannot change what is read."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from adapters.slurm_rest import SlurmRestAdapter
from adapters.slurm_rest import client as rest_client
from adapters.slurm_ssh import SlurmSSHAdapter
from broker.adapter import ClusterAdapter
from tests.contract.factory_slurm_rest import load_settings
from tests.contract.factory_slurm_ssh import load_connection
from tests.support import slurm
from tests.support.env import broker_env

ACCOUNTS = {"aifa-burst-a": 8, "aifa-burst-b": 8}
#: one account's burst: at half its sacct output, the cap still fits the largest answer
#: the broker reads through slurm_ssh while registering the cluster (scontrol show config, ~8 KB)
SOLO = {"aifa-burst-solo": 300}
#: the cap of every slurm_ssh command, which registration must fit in
SSH_CAP_FLOOR = 10 * 1024
#: small, so that a window's read is about its own width (adapters.slurm_common.window)
MARGIN_SECONDS = 5


def _measure_rest(patch: pytest.MonkeyPatch, sizes: list[int]) -> None:
    """Every slurmrestd answer read whole, uncapped, its size appended to ``sizes``."""
    read = rest_client._read_capped

    def measured(response: Any, max_bytes: int | None, during: str) -> bytes:
        content = read(response, None, during)
        sizes.append(len(content))
        return content

    patch.setattr(rest_client, "_read_capped", measured)


def _imported_once(env: Any, ids: list[str], what: str) -> None:
    """A few import cycles charge every job of ``ids`` once (one cancelled while waiting
    is recorded, uncharged), and a later cycle nothing."""
    importer = env.app.state.tracker.importer
    imported = sum(importer.run_cycle(force=True) for _ in range(3))
    with env.engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT i.scheduler_job_id, i.charged, COUNT(l.id) FROM imported_jobs i LEFT JOIN ledger_entries l "
            "ON l.imported_job_id = i.id GROUP BY i.scheduler_job_id, i.charged")).all()
    by_job = {str(job): (charged, entries) for job, charged, entries in rows}
    assert sorted(by_job) == sorted(ids), f"{what}: every job of the burst imported, each once"
    assert all(entries == (1 if charged > 0 else 0) for charged, entries in by_job.values()), by_job
    assert imported == sum(1 for charged, _ in by_job.values() if charged > 0)
    assert importer.run_cycle(force=True) == 0  # a later cycle charges nothing again


def _answer_sizes(release: str, since: datetime, monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, ...], int]:
    """Bytes slurmrestd answers for the burst's window: both accounts, and each alone."""
    sizes: list[int] = []
    adapter = SlurmRestAdapter(f"burst-{release}", {**load_settings(release),
                                                    "usage_clock_margin_seconds": MARGIN_SECONDS}, data_dir="/tmp")
    found: dict[tuple[str, ...], int] = {}
    with monkeypatch.context() as patch:
        _measure_rest(patch, sizes)
        try:
            deadline = time.monotonic() + 60
            # slurmdbd may list a job ended (sacct -j) a moment before a query by end time finds it
            while len(adapter.usage(since, accounts=list(ACCOUNTS))) < sum(ACCOUNTS.values()):
                assert time.monotonic() < deadline, "the burst never showed whole in slurmdb/jobs"
                time.sleep(1)
            for accounts in (tuple(ACCOUNTS), *((a,) for a in ACCOUNTS)):
                records = adapter.usage(since, accounts=list(accounts))
                assert len(records) == sum(ACCOUNTS[a] for a in accounts), (accounts, records)
                found[accounts] = sizes[-1]
        finally:
            adapter.close()
    return found


def _burst(release: str, accounts: dict[str, int]) -> tuple[list[str], datetime]:
    """bob's burst on the test's own ``accounts``: (job ids, a moment before it)."""
    slurm.require_cluster(release)
    for account in accounts:
        slurm.ensure_account(release, account, ("bob",))
    started = datetime.now(UTC)
    return slurm.burst(release, "bob", accounts), started


@pytest.mark.slurm
@pytest.mark.parametrize("release", slurm.RELEASES)
def test_a_burst_too_large_for_one_answer_is_imported_once(
        release: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, started = _burst(release, ACCOUNTS)
    since = started - timedelta(seconds=20)
    sizes = _answer_sizes(release, since, monkeypatch)
    whole, parts = sizes[tuple(ACCOUNTS)], [sizes[(a,)] for a in ACCOUNTS]
    assert whole > 1.5 * max(parts), sizes
    cap = (whole + max(parts)) // 2  # one account's share fits, the whole burst does not
    definition = slurm.definition(release, "slurm_rest")
    definition["connection"].update(usage_max_response_bytes=cap, usage_clock_margin_seconds=MARGIN_SECONDS)
    lookback = (datetime.now(UTC) - since).total_seconds() / 3600
    with broker_env(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite3'}", run_tracker=False,
                    usage_lookback_hours=lookback) as env:
        r = env.call("POST", "/v1/clusters", env.qm, json=definition)
        assert r.status_code == 201, r.text
        for i, account in enumerate(ACCOUNTS):
            env.setup_project(f"EHPC-BURST-{i}", amount=100, unit="core_hours", members=("bob",),
                              cluster=definition["name"], account=account)
        _imported_once(env, ids, "slurm_rest")


def _solo_answer(adapter: str, release: str, since: datetime, monkeypatch: pytest.MonkeyPatch) -> int:
    """Bytes of the solo burst's accounting answer through ``adapter``, once it shows whole."""
    sizes: list[int] = []
    made: ClusterAdapter
    with monkeypatch.context() as patch:
        if adapter == "slurm_rest":
            _measure_rest(patch, sizes)
            made = SlurmRestAdapter(f"solo-{release}", {**load_settings(release),
                                                       "usage_clock_margin_seconds": MARGIN_SECONDS}, data_dir="/tmp")
        else:
            query = SlurmSSHAdapter._query

            def counted(self: SlurmSSHAdapter, user: str, command: str, what: str) -> str:
                out = query(self, user, command, what)
                sizes.append(len(out.encode()))
                return out

            patch.setattr(SlurmSSHAdapter, "_query", counted)
            made = SlurmSSHAdapter(f"solo-{release}", {**(load_connection(release) or {}), "query_username": "alice",
                                                      "usage_clock_margin_seconds": MARGIN_SECONDS}, data_dir="/tmp")
        try:
            deadline = time.monotonic() + 60
            while len(made.usage(since, accounts=list(SOLO))) < sum(SOLO.values()):
                assert time.monotonic() < deadline, "the burst never showed whole in accounting"
                time.sleep(1)
            return sizes[-1]
        finally:
            made.close()


@pytest.mark.slurm
@pytest.mark.parametrize("release", slurm.RELEASES)
def test_one_accounts_burst_too_large_for_any_answer_is_streamed_once(
        release: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """One account's jobs ending in the same second, the cap at half their answer: the
    import streams the narrowest window through either adapter and charges each job once
    (it used to stop there: "usage import stuck", every cycle)."""
    ids, started = _burst(release, SOLO)
    since = started - timedelta(seconds=20)
    (account,) = SOLO
    caplog.set_level(logging.INFO, logger="broker.usage_import")
    for adapter in slurm.ADAPTERS:
        whole = _solo_answer(adapter, release, since, monkeypatch)
        cap = whole // 2
        definition = slurm.definition(release, adapter)
        if adapter == "slurm_rest":
            definition["connection"].update(usage_max_response_bytes=cap)
        else:
            assert cap >= SSH_CAP_FLOOR, f"the burst's sacct output ({whole} bytes) is too small for this test"
            definition["connection"].update(max_output_bytes=cap)
        definition["connection"].update(usage_clock_margin_seconds=MARGIN_SECONDS)
        lookback = (datetime.now(UTC) - since).total_seconds() / 3600
        caplog.clear()
        with broker_env(tmp_path / adapter, f"sqlite:///{tmp_path / f'{adapter}.sqlite3'}", run_tracker=False,
                        usage_lookback_hours=lookback) as env:
            r = env.call("POST", "/v1/clusters", env.qm, json=definition)
            assert r.status_code == 201, r.text
            env.setup_project("EHPC-SOLO-0", amount=100, unit="core_hours", members=("bob",),
                              cluster=definition["name"], account=account)
            _imported_once(env, ids, adapter)
            assert "streaming it" in caplog.text and "stuck" not in caplog.text, adapter
