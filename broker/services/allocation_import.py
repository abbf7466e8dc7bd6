"""Import projects, allocations and memberships exported by an allocation system.

Formats (documented in docs/import.md):

JSON::

    {"projects": [{"code": "EHPC-AIF-2026A01-042", "title": "...", "status": "active",
                   "access_mode": "fast-lane", "start_date": "2026-01-01", "end_date": "2026-12-31",
                   "allocations": [{"cluster": "leonardo", "unit": "gpu_hours", "amount": 5000,
                                    "account": "aif26a01_042", "start_date": null, "end_date": null}],
                   "members": [{"user": "alice@example.eu", "role": "pi"}]}]}

CSV (one row per object, first column ``kind``; empty cells = not given)::

    kind,project,title,status,access_mode,start_date,end_date,cluster,unit,amount,account,user,role
    project,EHPC-AIF-2026A01-042,LLM fine-tuning,active,fast-lane,2026-01-01,2026-12-31,,,,,,
    allocation,EHPC-AIF-2026A01-042,,,,,,leonardo,gpu_hours,5000,aif26a01_042,,
    member,EHPC-AIF-2026A01-042,,,,,,,,,,alice@example.eu,pi

Everything is validated first with the API's own schemas; one error anywhere and
nothing is applied (every error is listed with where it is). Applying is
idempotent: a project is keyed by code, an allocation by (project, cluster,
account, unit), a membership by (project, user). A changed amount becomes an
``adjust`` ledger entry (never below what is charged and reserved), changed
project fields or dates are updated, a changed role is updated; the same file
applied twice changes nothing the second time.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from pydantic import ValidationError
from sqlmodel import Session, select

from broker.errors import InvalidRequest
from broker.models import Allocation, Cluster, Project
from broker.schemas import AllocationIn, AllocationPatch, MemberIn, ProjectIn
from broker.services import projects as project_svc
from broker.services.account_import import ImportReport
from broker.services.common import find_user, membership_role, to_micro

CSV_COLUMNS = ("kind", "project", "title", "status", "access_mode", "start_date", "end_date",
               "cluster", "unit", "amount", "account", "user", "role")


def parse_file(text: str, fmt: str) -> list[dict[str, Any]]:
    """The file as a list of project dicts (JSON shape). ``fmt``: ``json`` or ``csv``."""
    if fmt == "json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("projects"), list):
            raise InvalidRequest('the JSON file must be {"projects": [...]}')
        if not all(isinstance(p, dict) for p in data["projects"]):
            raise InvalidRequest("every project must be an object")
        return list(data["projects"])
    if fmt != "csv":
        raise InvalidRequest(f"unknown format {fmt!r} (json or csv)")
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or set(reader.fieldnames) - set(CSV_COLUMNS) or "kind" not in reader.fieldnames:
        raise InvalidRequest(f"CSV header must use the columns {', '.join(CSV_COLUMNS)} (kind first)")
    projects: dict[str, dict[str, Any]] = {}
    errors = []
    for line, row in enumerate(reader, start=2):
        cells = {k: v.strip() for k, v in row.items() if k and v is not None and v.strip() != ""}
        kind, code = cells.pop("kind", ""), cells.pop("project", "")
        if not code:
            errors.append(f"line {line}: project is empty")
            continue
        entry = projects.setdefault(code, {"code": code, "allocations": [], "members": [], "_line": line})
        if kind == "project":
            entry.update({k: cells[k] for k in ("title", "status", "access_mode", "start_date", "end_date")
                          if k in cells})
            entry["_line"] = line
        elif kind == "allocation":
            entry["allocations"].append({**{k: cells[k] for k in ("cluster", "unit", "amount", "account",
                                                                   "start_date", "end_date") if k in cells},
                                         "_line": line})
        elif kind == "member":
            entry["members"].append({**{k: cells[k] for k in ("user", "role") if k in cells}, "_line": line})
        else:
            errors.append(f"line {line}: kind must be project, allocation or member (got {kind!r})")
    if errors:
        raise InvalidRequest("; ".join(errors[:50]), errors=errors)
    return list(projects.values())


def _where(item: dict[str, Any], fallback: str) -> str:
    line = item.get("_line")
    return f"line {line}" if line else fallback


def validate(raw: list[dict[str, Any]]) -> list[tuple[ProjectIn, list[AllocationIn], list[MemberIn]]]:
    """Every project, allocation and membership validated by the API's schemas; all
    errors together in one InvalidRequest."""
    out = []
    errors: list[str] = []

    def check(model: Any, data: dict[str, Any], where: str) -> Any:
        try:
            return model.model_validate({k: v for k, v in data.items() if not k.startswith("_")})
        except ValidationError as exc:
            errors.extend(f"{where}: {'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors())
            return None

    seen: set[str] = set()
    for i, proj in enumerate(raw):
        where = _where(proj, f"projects[{i}]")
        body = {k: v for k, v in proj.items() if k not in ("allocations", "members")}
        project = check(ProjectIn, body, where)
        if project is not None and project.code in seen:
            errors.append(f"{where}: project {project.code} appears twice")
        allocs = [check(AllocationIn, a, _where(a, f"{where}.allocations[{j}]"))
                  for j, a in enumerate(proj.get("allocations") or [])]
        members = [check(MemberIn, m, _where(m, f"{where}.members[{j}]"))
                   for j, m in enumerate(proj.get("members") or [])]
        if project is not None:
            seen.add(project.code)
            out.append((project, [a for a in allocs if a], [m for m in members if m]))
    if errors:
        raise InvalidRequest(f"{len(errors)} problem(s): " + "; ".join(errors[:20]), errors=errors)
    return out


def import_allocations(session: Session, *, text: str, fmt: str, apply: bool, source: str) -> ImportReport:
    """Validate the whole file, then propose (or apply) each object. Idempotent."""
    items = validate(parse_file(text, fmt))
    report = ImportReport(source=source, applied=apply)
    for project_in, allocs, members in items:
        project = _project(session, report, project_in, apply=apply)
        for alloc_in in allocs:
            _allocation(session, report, project, project_in.code, alloc_in, apply=apply)
        for member_in in members:
            _member(session, report, project, project_in.code, member_in, apply=apply)
    session.flush()
    return report


def _project(session: Session, report: ImportReport, body: ProjectIn, *, apply: bool) -> Project | None:
    project = session.exec(select(Project).where(Project.code == body.code)).first()
    if project is None:
        report.add("project", body.code, "new", body.title)
        if apply:
            project = project_svc.create_project(session, principal=None, body=body)
        return project
    wanted = body.model_dump(exclude={"code", "attributes"}, exclude_unset=True)
    diff = {k: v for k, v in wanted.items() if getattr(project, k) != v}
    report.add("project", body.code, "update" if diff else "exists", ", ".join(sorted(diff)))
    if diff and apply:
        for key, value in diff.items():
            setattr(project, key, value)
        session.add(project)
    return project


def _allocation(session: Session, report: ImportReport, project: Project | None, code: str, body: AllocationIn,
                *, apply: bool) -> None:
    key = f"{code}/{body.cluster}/{body.account}/{body.unit}"
    cluster = session.exec(select(Cluster).where(Cluster.name == body.cluster)).first()
    if cluster is None:
        report.add("allocation", key, "conflict", f"no cluster {body.cluster}")
        return
    alloc = None
    if project is not None:
        alloc = session.exec(select(Allocation).where(
            Allocation.project_id == project.id, Allocation.cluster_id == cluster.id,
            Allocation.account == body.account, Allocation.unit == body.unit)).first()
    if alloc is None:
        report.add("allocation", key, "new", f"{body.amount:g} {body.unit}")
        if apply:
            project_svc.grant_allocation(session, principal=None, code=code, body=body, actor="import")
        return
    patch: dict[str, Any] = {}
    if alloc.granted != to_micro(body.amount):
        patch["amount"] = body.amount
    for field_name in ("start_date", "end_date"):
        if field_name in body.model_fields_set and getattr(alloc, field_name) != getattr(body, field_name):
            patch[field_name] = getattr(body, field_name)
    if not patch:
        report.add("allocation", key, "exists")
        return
    report.add("allocation", key, "update", ", ".join(f"{k}={v}" for k, v in sorted(patch.items())))
    if apply:
        project_svc.adjust_allocation(session, principal=None, code=code, allocation_id=alloc.id or 0,
                                      body=AllocationPatch(**patch, reason="allocation-system import"),
                                      actor="import")


def _member(session: Session, report: ImportReport, project: Project | None, code: str, body: MemberIn,
            *, apply: bool) -> None:
    key = f"{body.user}@{code}"
    user = find_user(session, body.user)
    role = None
    if project is not None and user is not None:
        role = membership_role(session, project, user)
    status = "new" if role is None else ("exists" if role == body.role else "update")
    report.add("membership", key, status, body.role)
    if status != "exists" and apply:
        project_svc.add_member(session, principal=None, code=code, body=body)
