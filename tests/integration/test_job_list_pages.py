"""The job list (GET /v1/jobs) is read as a union of bounded, index-ordered branches
(a caller's own jobs; each project they lead, others' jobs; everything for a quota
manager). Whatever the shape, the answer must be the visible jobs, filtered, newest
first by (created_at, id), paged by the cursor without gaps or repeats — checked
here against a reference computed in Python, for callers in every role, every
filter and several page sizes, with jobs that share a creation time."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from broker.auth import Principal
from broker.models import Allocation, Cluster, Job, Project, User
from broker.services import jobs as job_service
from tests.support.env import BrokerEnv, broker_env

#: who leads what (A, B, C are projects): alice is a member of A and PI of B, erin PI
#: of A and B, bob a member of A and B, frank a member of C only
PROJECTS = {"PRJ-A": (("alice", "bob"), "carol"), "PRJ-B": (("bob", "dave"), "alice"), "PRJ-C": (("frank",), "gina")}
STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED")


@dataclass(frozen=True)
class Row:
    id: str
    project: str
    user: str
    state: str
    created_at: datetime


@pytest.fixture
def listed(db_url: str, tmp_path: Path) -> Iterator[tuple[BrokerEnv, list[Row]]]:
    """A broker (no tracker) with 60 jobs over three projects, six users, four states,
    and creation times that repeat (ties ordered by id)."""
    with broker_env(tmp_path, db_url, run_tracker=False) as env:
        for i, (code, (members, pi)) in enumerate(PROJECTS.items()):
            env.setup_project(code, members=members, pi=pi, account=f"acct-{i}")
        for code in ("PRJ-A", "PRJ-B"):
            r = env.call("POST", f"/v1/projects/{code}/members", env.qm, json={"user": "erin", "role": "pi"})
            assert r.status_code == 201, r.text
        yield env, _insert_jobs(env)


def _insert_jobs(env: BrokerEnv) -> list[Row]:
    base = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    members = [(code, user) for code, (ms, pi) in PROJECTS.items() for user in (*ms, pi)]
    rows = []
    with Session(env.engine) as session:
        cluster = session.exec(select(Cluster).where(Cluster.name == "local")).one()
        users = {u.name: u for u in session.exec(select(User)).all()}
        for n in range(60):
            code, user = members[(n * 7) % len(members)]
            project = session.exec(select(Project).where(Project.code == code)).one()
            alloc = session.exec(select(Allocation).where(Allocation.project_id == project.id)).one()
            # ids not in creation order, and a third of the times shared with another job
            row = Row(id=f"{(n * 37) % 61:02d}job{n:02d}", project=code, user=user, state=STATES[n % 4],
                      created_at=base + timedelta(seconds=(n // 3) * 2 + (n % 3 == 2)))
            rows.append(row)
            session.add(Job(id=row.id, project_id=project.id, cluster_id=cluster.id, user_id=users[user].id,
                            allocation_id=alloc.id, name=f"j{n}", username=user, account=alloc.account,
                            state=row.state, unit=alloc.unit, created_at=row.created_at))
        session.commit()
    assert len({r.created_at for r in rows}) < len(rows)  # there are ties
    return rows


def _visible(rows: list[Row], who: str, quota_manager: bool) -> list[Row]:
    led = {code for code, (_, pi) in PROJECTS.items() if pi == who} | ({"PRJ-A", "PRJ-B"} if who == "erin" else set())
    seen = [r for r in rows if quota_manager or r.user == who or r.project in led]
    return sorted(seen, key=lambda r: (r.created_at, r.id), reverse=True)


def _pages(env: BrokerEnv, principal: Principal, limit: int, **filters: str | None) -> list[list[str]]:
    """Every page of the list, following the cursor to its end."""
    pages: list[list[str]] = []
    cursor = None
    with Session(env.engine) as session:
        while True:
            page = job_service.list_jobs(session, principal=principal, limit=limit, cursor=cursor,
                                         **{k: filters.get(k) for k in ("project", "state", "cluster", "user")})
            pages.append([item["id"] for item in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                return pages
            assert len(pages) <= 100, "the cursor does not move on"


def test_every_caller_filter_and_page_size_gets_the_visible_jobs_in_order(listed: tuple[BrokerEnv, list[Row]]) -> None:
    env, rows = listed
    callers = [(name, False) for name in ("alice", "bob", "carol", "erin", "frank", "nobody")] + [("qm", True)]
    filters: list[dict[str, str | None]] = [
        {}, {"project": "PRJ-A"}, {"project": "PRJ-B"}, {"project": "PRJ-C"}, {"project": "NO-SUCH"},
        {"state": "RUNNING"}, {"user": "bob"}, {"user": "alice"}, {"user": "nobody"}, {"cluster": "local"},
        {"cluster": "elsewhere"}, {"project": "PRJ-B", "user": "dave", "state": "FAILED"}]
    for (name, qm), chosen, limit in itertools.product(callers, filters, (1, 4, 7, 100)):
        principal = Principal(name=name, roles=frozenset({"quota_manager"} if qm else set()))
        want = [r.id for r in _visible(rows, name, qm)
                if all(getattr(r, key) == value for key, value in chosen.items() if key != "cluster")
                and chosen.get("cluster", "local") == "local"]
        pages = _pages(env, principal, limit, **chosen)
        got = [job_id for page in pages for job_id in page]
        assert got == want, (name, chosen, limit)
        # full pages until the last; a cursor only when more jobs follow
        assert all(len(p) == limit for p in pages[:-1]) and len(pages[-1]) <= limit, (name, chosen, limit)
        assert len(pages) == max(1, -(-len(want) // limit)), (name, chosen, limit)


def test_the_lists_are_exercised(listed: tuple[BrokerEnv, list[Row]]) -> None:
    """The reference is not trivially empty: each role sees what it should."""
    _, rows = listed
    assert {r.project for r in _visible(rows, "alice", False)} == {"PRJ-A", "PRJ-B"}  # own in A, all of B
    assert {r.user for r in _visible(rows, "alice", False) if r.project == "PRJ-A"} == {"alice"}
    assert {r.project for r in _visible(rows, "frank", False)} == {"PRJ-C"}
    assert len(_visible(rows, "qm", True)) == len(rows)
    assert not _visible(rows, "nobody", False)


def test_the_list_answers_are_the_jobs_answers(listed: tuple[BrokerEnv, list[Row]]) -> None:
    """Over HTTP: each item of a PI's page is what GET /v1/jobs/{id} answers, and another
    project's jobs are neither listed nor readable."""
    env, rows = listed
    alice = env.auth("alice")
    page = env.call("GET", "/v1/jobs", alice, params={"limit": 100})
    assert page.status_code == 200, page.text
    items = page.json()["items"]
    assert [i["id"] for i in items] == [r.id for r in _visible(rows, "alice", False)]
    for item in items[:5]:
        assert env.job(item["id"], alice) == item
    hidden = next(r for r in rows if r.project == "PRJ-C")
    assert env.call("GET", f"/v1/jobs/{hidden.id}", alice).status_code == 404
    assert env.call("GET", "/v1/jobs", alice, params={"project": "PRJ-C"}).json()["items"] == []
