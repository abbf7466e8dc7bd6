"""Operator commands on the broker host (registered on the ``aifa-broker`` typer app).

``plugins``; ``cluster update|remove|drain|resume|sync|drift|import-accounts``;
``allocation list|adjust|import``. They act on the database and data directory
of the settings, like the other operator commands in :mod:`broker.cli`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from sqlmodel import Session, col, select

from broker import plugins as plugin_registry
from broker.cli import _errors, _fail, _read_definition, _settings, _unit, allocation_app, app, cluster_app
from broker.models import Allocation, Cluster, Project
from broker.registry import AdapterRegistry
from broker.schemas import AllocationPatch, ClusterPatch
from broker.services import clusters as cluster_svc
from broker.services import enforcement as enforcement_svc
from broker.services import projects as project_svc

T = TypeVar("T")


def _with_registry(fn: Callable[[Session, AdapterRegistry], T]) -> T:
    """Run ``fn`` in one transaction with an adapter registry closed afterwards
    (adapters hold SSH pools and HTTP clients)."""
    registry = AdapterRegistry(_settings())
    try:
        return _unit(lambda s: fn(s, registry))
    finally:
        registry.close()


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# ------------------------------------------------------------------ plugins

@app.command("plugins")
def plugins_cmd(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List the adapters and policies installed (entry points), their version and load status.

    A plugin that fails to import is reported with its error; the others still load,
    and the command exits 0 (exit 1 only when nothing at all is installed)."""
    rows = plugin_registry.inventory()
    if as_json:
        _echo_json([r.as_dict() for r in rows])
    else:
        for r in rows:
            status = "ok" if r.ok else f"BROKEN: {r.error}"
            typer.echo(f"{r.kind:<7} {r.name:<22} {r.distribution} {r.version}\t{r.target}\t{status}")
    if not rows:
        raise typer.Exit(1)


# ------------------------------------------------------------------ clusters

def _update(name: str, body: ClusterPatch) -> Cluster:
    return _with_registry(lambda s, reg: cluster_svc.update_cluster(
        s, principal=None, registry=reg, name=name, body=body))


@cluster_app.command("update")
def cluster_update(
    name: str,
    from_file: Annotated[Path | None, typer.Option("--from-file", help="new connection/cost_model/... "
                                                   "from a definition file (same name; adapter fixed)")] = None,
    description: Annotated[str | None, typer.Option()] = None,
    default_partition: Annotated[str | None, typer.Option()] = None,
    poll_interval: Annotated[float | None, typer.Option(help="seconds")] = None,
    enforce_budgets: Annotated[bool | None, typer.Option(
        "--enforce-budgets/--no-enforce-budgets", help="Slurm-native enforcement of the allocations")] = None,
) -> None:
    """Change a registered cluster (a new connection is checked live, like ``cluster add``)."""
    changes: dict[str, Any] = {}
    if from_file is not None:
        data = _read_definition(from_file)
        data.pop("slurm_release", None)
        if data.pop("name", name) != name:
            _fail(f"{from_file} defines another cluster than {name}")
        data.pop("adapter", None)
        changes.update(data)
    for key, value in (("description", description), ("default_partition", default_partition),
                       ("poll_interval_seconds", poll_interval), ("enforce_budgets", enforce_budgets)):
        if value is not None:
            changes[key] = value
    if not changes:
        _fail("nothing to change (see --help)")
    with _errors():
        body = ClusterPatch.model_validate(changes)
    c = _update(name, body)
    typer.echo(f"updated cluster {c.name}: {', '.join(sorted(changes))}")


@cluster_app.command("drain")
def cluster_drain(name: str) -> None:
    """Stop accepting jobs on a cluster (503 ``cluster_unavailable``); tracking goes on."""
    _update(name, ClusterPatch(state="draining"))
    typer.echo(f"cluster {name} is draining: new submissions are refused, running jobs are still tracked")


@cluster_app.command("resume")
def cluster_resume(name: str) -> None:
    """Accept jobs on a drained (or offline) cluster again."""
    _update(name, ClusterPatch(state="online"))
    typer.echo(f"cluster {name} is online")


@cluster_app.command("remove")
def cluster_remove(name: str) -> None:
    """Remove a cluster with no allocations and no jobs (otherwise drain it)."""
    _with_registry(lambda s, reg: cluster_svc.delete_cluster(s, principal=None, registry=reg, name=name))
    typer.echo(f"removed cluster {name}")


def _print_report(report: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        _echo_json(report)
        return
    mode = "plan (dry run, nothing changed)" if report["dry_run"] else "sync"
    typer.echo(f"cluster {report['cluster']} (Slurm cluster {report['slurm_cluster']}), enforcement "
               f"{'on' if report['enabled'] else 'OFF'} — {mode}: {len(report['changes'])} change(s)")
    for change in report["changes"]:
        typer.echo(f"  {change['describe']}")
    if report["applied"]:
        typer.echo("applied")


@cluster_app.command("sync")
def cluster_sync(name: str,
                 dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, change nothing")] = False,
                 as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Mirror the cluster's allocations into Slurm (accounts, associations, GrpTRESMins)."""
    report = _with_registry(lambda s, reg: enforcement_svc.sync_cluster(
        s, principal=None, registry=reg, name=name, dry_run=dry_run).as_dict())
    _print_report(report, as_json=as_json)


@cluster_app.command("drift")
def cluster_drift(name: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Compare the broker's allocations with Slurm's accounting; exit 1 when they differ."""
    report = _with_registry(lambda s, reg: enforcement_svc.sync_cluster(
        s, principal=None, registry=reg, name=name, dry_run=True).as_dict())
    _print_report(report, as_json=as_json)
    if report["changes"]:
        raise typer.Exit(1)


# --------------------------------------------------------------- allocations

@allocation_app.command("list")
def allocation_list(project: Annotated[str | None, typer.Option()] = None,
                    cluster: Annotated[str | None, typer.Option()] = None,
                    as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Allocations with their balances (units): granted, charged, reserved, remaining."""
    def rows(session: Session) -> list[dict[str, Any]]:
        q = select(Allocation, Project, Cluster).join(Project, Project.id == Allocation.project_id)  # type: ignore[arg-type]
        q = q.join(Cluster, Cluster.id == Allocation.cluster_id)  # type: ignore[arg-type]
        if project:
            q = q.where(Project.code == project)
        if cluster:
            q = q.where(Cluster.name == cluster)
        out = []
        for alloc, proj, clus in session.exec(q.order_by(col(Allocation.id))).all():
            item = project_svc.allocation_out(alloc, clus.name).model_dump(mode="json")
            out.append({"project": proj.code, **item})
        return out

    items = _unit(rows)
    if as_json:
        _echo_json(items)
        return
    for a in items:
        typer.echo(f"{a['id']}\t{a['project']}\t{a['cluster']}\t{a['account']}\t{a['unit']}\t"
                   f"granted={a['granted']:g} charged={a['charged']:g} reserved={a['reserved']:g} "
                   f"remaining={a['remaining']:g}\t{a['start_date'] or '-'}..{a['end_date'] or '-'}")


@allocation_app.command("adjust")
def allocation_adjust(allocation_id: int,
                      amount: Annotated[float | None, typer.Option(help="new granted amount")] = None,
                      end_date: Annotated[str | None, typer.Option()] = None,
                      start_date: Annotated[str | None, typer.Option()] = None,
                      reason: Annotated[str, typer.Option()] = "") -> None:
    """Change an allocation: a new amount is an ``adjust`` ledger entry (never below charged + reserved)."""
    changes: dict[str, Any] = {"reason": reason}
    for key, value in (("amount", amount), ("end_date", end_date), ("start_date", start_date)):
        if value is not None:
            changes[key] = value
    with _errors():
        body = AllocationPatch.model_validate(changes)

    def adjust(session: Session) -> str:
        from broker.errors import NotFound

        alloc = session.get(Allocation, allocation_id)
        if alloc is None:
            raise NotFound(f"No allocation {allocation_id}.")
        project = session.get(Project, alloc.project_id)
        assert project is not None
        done = project_svc.adjust_allocation(session, principal=None, code=project.code,
                                             allocation_id=allocation_id, body=body, actor="cli")
        cluster = session.get(Cluster, done.cluster_id)
        out = project_svc.allocation_out(done, cluster.name if cluster else "?")
        return f"allocation {allocation_id}: granted {out.granted:g} {out.unit}, remaining {out.remaining:g}"

    typer.echo(_unit(adjust))


# ------------------------------------------------------------------- imports

def _print_import(report: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        _echo_json(report)
        return
    verb = "applied" if report["applied"] else "proposal (dry run, nothing changed; --apply to carry it out)"
    typer.echo(f"import from {report['source']} — {verb}: {report['changes']} change(s)")
    for kind, counts in sorted(report["counts"].items()):
        typer.echo(f"  {kind}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    for item in report["items"]:
        if item["status"] != "exists":
            typer.echo(f"  {item['status']:<8} {item['kind']:<15} {item['key']}"
                       + (f"  ({item['detail']})" if item["detail"] else ""))


@cluster_app.command("import-accounts")
def cluster_import_accounts(
    name: str,
    apply: Annotated[bool, typer.Option("--apply", help="create what is proposed (default: dry run)")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Propose projects, users, cluster accounts and memberships from the cluster's Slurm
    accounts and associations (dry run first; ``--apply`` creates them; idempotent)."""
    from broker.services.account_import import import_accounts

    report = _with_registry(lambda s, reg: import_accounts(s, registry=reg, name=name, apply=apply).as_dict())
    _print_import(report, as_json=as_json)


@allocation_app.command("import")
def allocation_import(
    file: Path,
    apply: Annotated[bool, typer.Option("--apply", help="carry out the changes (default: dry run)")] = False,
    fmt: Annotated[str | None, typer.Option("--format", help="json or csv (default: from the file name)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Import projects, allocations and memberships from an allocation system's JSON or
    CSV export (validated as a whole; idempotent; docs/import.md)."""
    from broker.services.allocation_import import import_allocations

    if not file.is_file():
        _fail(f"{file} does not exist")
    kind = fmt or ("csv" if file.suffix.lower() == ".csv" else "json")
    text = file.read_text(encoding="utf-8")
    report = _unit(lambda s: import_allocations(s, text=text, fmt=kind, apply=apply, source=str(file)).as_dict())
    _print_import(report, as_json=as_json)
