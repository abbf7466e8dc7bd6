"""The ``aifa-broker`` command line (typer). Errors print one sentence, exit non-zero."""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from pydantic import ValidationError

from broker.adapter import AdapterError
from broker.auth import issue_token
from broker.bootstrap import engine_for, ensure_local_cluster
from broker.cli_jobs import budget, job_app
from broker.config import Settings, get_settings
from broker.db import session_scope
from broker.errors import BrokerError
from broker.registry import AdapterRegistry
from broker.schemas import AllocationIn, ClusterIn, MemberIn, ProjectIn
from broker.services import clusters as cluster_svc
from broker.services import ledger
from broker.services import projects as project_svc

app = typer.Typer(help="aifa-broker: compute-access broker for EuroHPC AI Factory allocations.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
cluster_app = typer.Typer(help="Cluster registry (sysadmin).", no_args_is_help=True)
project_app = typer.Typer(help="Projects (quota manager).", no_args_is_help=True)
allocation_app = typer.Typer(help="Allocations (quota manager).", no_args_is_help=True)
member_app = typer.Typer(help="Project membership.", no_args_is_help=True)
account_app = typer.Typer(help="Cluster accounts (sysadmin).", no_args_is_help=True)
ledger_app = typer.Typer(help="The budget ledger.", no_args_is_help=True)
for sub, name in ((job_app, "job"), (db_app, "db"), (cluster_app, "cluster"), (project_app, "project"),
                  (allocation_app, "allocation"), (member_app, "member"), (account_app, "account"),
                  (ledger_app, "ledger")):
    app.add_typer(sub, name=name)
app.command("budget")(budget)

T = TypeVar("T")


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return get_settings()
    except (ValidationError, ValueError) as exc:
        _fail(f"invalid settings: {exc}")
        raise AssertionError from exc  # unreachable


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except BrokerError as exc:
        _fail(f"{exc.detail} [{exc.code}]")
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    except AdapterError as exc:
        _fail(f"{exc} [{exc.code}]")


def _require_database(settings: Settings) -> None:
    """Operator commands work on the broker's own database: on a machine without one
    (no database configured, no embedded database yet) say so instead of silently
    creating an empty one and answering "No project"."""
    if settings.database_url is not None:
        return
    path = settings.data_dir / "broker.sqlite3"
    if path.exists():
        return
    _fail(f"no broker database here: AIFA_BROKER_DATABASE_URL is not set and {path} does not exist. "
          "Operator commands (project, allocation, member, account, cluster, ledger) run where the broker "
          "runs, on its database (set AIFA_BROKER_CONFIG / AIFA_BROKER_DATABASE_URL, or create the embedded "
          "one with `aifa-broker db upgrade` or `aifa-broker demo`). From another machine use the HTTP "
          "commands (`aifa-broker job ...`, AIFA_BROKER_URL and AIFA_BROKER_TOKEN) or the API.")


def _unit(fn: Callable[[Any], T], *, create: bool = False) -> T:
    """Run ``fn`` in one transaction on the broker's database (``create``: the
    embedded database may be created here, else it must exist)."""
    settings = _settings()
    if not create:
        _require_database(settings)
    with _errors():
        engine = engine_for(settings)
        ensure_local_cluster(engine, settings)
        with session_scope(engine) as session:
            return fn(session)
    raise AssertionError  # unreachable


@app.command()
def serve(host: Annotated[str | None, typer.Option()] = None,
          port: Annotated[int | None, typer.Option()] = None,
          workers: Annotated[int | None, typer.Option(
              min=1, help="API worker processes (default: the CPUs available); with more than one, "
                          "the tracker runs in one extra process")] = None) -> None:
    """Run the API and the tracker."""
    from broker import server

    settings = _settings()
    host, port = host or settings.host, port or settings.port
    local = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 - a comparison
    _record_served_url(settings, f"http://{local}:{port}")
    server.run(settings, host=host, port=port, workers=workers or server.default_workers())


SERVED_URL_FILE = "serve.url"


def _record_served_url(settings: Settings, url: str) -> None:
    """Where `serve` listens, for `demo` to print (the data directory is per broker)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / SERVED_URL_FILE).write_text(f"{url} {os.getpid()}\n")


def _served_url(settings: Settings) -> str | None:
    """The URL of this data directory's running `serve`, if one runs."""
    try:
        url, pid = (settings.data_dir / SERVED_URL_FILE).read_text().split()
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return None
    return url


@app.command()
def tracker() -> None:
    """Run only the tracker (polling, settlement, reconciliation, usage import)."""
    from broker.tracker import Tracker

    settings = _settings()
    logging.basicConfig(level=settings.log_level)
    engine = engine_for(settings)
    runner = Tracker(engine, settings, AdapterRegistry(settings))
    runner.importer.start()  # usage import on its own thread, as in `serve`
    runner.run_forever()


@app.command()
def token(sub: Annotated[str, typer.Option(help="user name (token subject)")],
          role: Annotated[list[str] | None, typer.Option(help="quota_manager and/or sysadmin")] = None,
          lifetime: Annotated[int | None, typer.Option(help="seconds")] = None) -> None:
    """Print a bearer token of the embedded issuer."""
    settings = _settings()
    if settings.mode != "embedded":
        _fail("tokens are issued by your identity provider in production mode")
    try:
        typer.echo(issue_token(settings, sub=sub, roles=role or [], lifetime=lifetime))
    except ValueError as exc:
        _fail(str(exc))


@app.command("signing-key")
def signing_key(path: Annotated[Path, typer.Argument(help="where to write the new key (must not exist)")]) -> None:
    """Write a new ES256 signing key (JWK, mode 0600) for the embedded issuer — the first
    step of a key rotation (docs/operations.md); prints its key id."""
    from broker.auth import write_signing_key

    if path.exists():
        _fail(f"{path} exists; a signing key is never overwritten")
    typer.echo(write_signing_key(path).kid)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all schema migrations (creates the embedded database when there is none)."""
    from broker.migrate import upgrade

    settings = _settings()
    with _errors():
        applied = upgrade(engine_for(settings, migrate=False))
    typer.echo("database schema migrated to the newest revision" if applied
               else "database schema is up to date")


def _read_definition(path: Path) -> dict[str, Any]:
    if not path.is_file():
        _fail(f"{path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in {".yaml", ".yml"}:
            return dict(yaml.safe_load(text))
        return dict(json.loads(text))
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        _fail(f"{path} is not valid {path.suffix.lstrip('.')}: {exc}")
        raise AssertionError from exc


@cluster_app.command("add")
def cluster_add(from_file: Annotated[Path, typer.Option("--from-file", help="TOML, YAML or JSON definition")]) -> None:
    """Register a cluster from a definition file (checked live: discovery runs now)."""
    data = _read_definition(from_file)
    data.pop("slurm_release", None)
    settings = _settings()

    def add(session: Any) -> str:
        body = ClusterIn(**data)
        default_poll = settings.local_cluster_poll_seconds if body.adapter == "local" else settings.slurm_poll_seconds
        c = cluster_svc.register_cluster(session, principal=None, registry=AdapterRegistry(settings),
                                         body=body, default_poll=default_poll)
        parts = ", ".join(p["name"] for p in c.partitions) or "none discovered"
        twins = cluster_svc.same_scheduler(session, c)
        same = (f"; same scheduler as {', '.join(twins)} ({c.scheduler_identity}): direct jobs are imported once"
                if twins else "")
        return (f"registered cluster {c.name} ({c.adapter}); partitions: {parts}; health: {c.health_detail}"
                f"{same}")

    typer.echo(_unit(add))


@cluster_app.command("list")
def cluster_list() -> None:
    """List registered clusters."""
    from sqlmodel import select

    from broker.models import Cluster

    def rows(session: Any) -> list[str]:
        health = {True: "ok", False: "down", None: "?"}
        return [f"{c.name}\t{c.adapter}\t{c.state}\thealth={health[c.health_ok]}"
                for c in session.exec(select(Cluster)).all()]

    for line in _unit(rows):
        typer.echo(line)


@cluster_app.command("check")
def cluster_check(name: str) -> None:
    """Live health check of a cluster through its adapter."""
    settings = _settings()
    health = _unit(lambda s: cluster_svc.check_health(s, registry=AdapterRegistry(settings), name=name))
    typer.echo(f"{name}: {'OK' if health.ok else 'DOWN'} — {health.detail}")
    for k, v in dict(health.checks).items():
        typer.echo(f"  {k}: {v}")
    if not health.ok:
        raise typer.Exit(1)


@project_app.command("create")
def project_create(code: str, title: Annotated[str, typer.Option()],
                   access_mode: Annotated[str, typer.Option()] = "playground",
                   start_date: Annotated[str | None, typer.Option()] = None,
                   end_date: Annotated[str | None, typer.Option()] = None) -> None:
    """Create a project."""
    body = dict(code=code, title=title, access_mode=access_mode, start_date=start_date, end_date=end_date)
    with _errors():
        model = ProjectIn.model_validate(body)
    modes = _settings().known_access_modes
    _unit(lambda s: project_svc.create_project(s, principal=None, body=model, access_modes=modes))
    typer.echo(f"created project {code}")


@project_app.command("show")
def project_show(code: str) -> None:
    """Show a project with its allocations and members (JSON)."""
    from sqlmodel import select

    from broker.errors import NotFound
    from broker.models import Project

    def show(session: Any) -> str:
        p = session.exec(select(Project).where(Project.code == code)).first()
        if p is None:
            raise NotFound(f"No project {code}.")
        return project_svc.project_out(session, p).model_dump_json(indent=2)

    typer.echo(_unit(show))


@allocation_app.command("grant")
def allocation_grant(project: str, cluster: Annotated[str, typer.Option()],
                     amount: Annotated[float, typer.Option()], account: Annotated[str, typer.Option()],
                     unit: Annotated[str, typer.Option()] = "gpu_hours",
                     start_date: Annotated[str | None, typer.Option()] = None,
                     end_date: Annotated[str | None, typer.Option()] = None) -> None:
    """Grant an allocation to a project on a cluster."""
    with _errors():
        body = AllocationIn.model_validate(dict(cluster=cluster, unit=unit, amount=amount, account=account,
                                                start_date=start_date, end_date=end_date))
    registry = AdapterRegistry(_settings())

    def grant(session: Any) -> tuple[Any, str | None]:
        warning = cluster_svc.check_scheduler_account(session, registry=registry, cluster_name=cluster,
                                                      account=body.account)  # as stored: lower case
        return project_svc.grant_allocation(session, principal=None, code=project, body=body, actor="cli"), warning

    alloc, warning = _unit(grant)
    registry.close()
    typer.echo(f"granted allocation {alloc.id}: {amount} {unit} on {cluster} (account {body.account})")
    if warning:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


@member_app.command("add")
def member_add(project: str, user: str, role: Annotated[str, typer.Option()] = "member") -> None:
    """Add a user to a project (creates the user if new)."""
    with _errors():
        body = MemberIn.model_validate({"user": user, "role": role})
    _unit(lambda s: project_svc.add_member(s, principal=None, code=project, body=body))
    typer.echo(f"{user} is now {role} of {project}")


@account_app.command("map")
def account_map(cluster: str, user: str, username: str) -> None:
    """Map a broker user to a POSIX account on a cluster."""
    from broker.schemas import AccountIn

    with _errors():
        AccountIn.model_validate({"username": username})
    registry = AdapterRegistry(_settings())

    def map_(session: Any) -> str | None:
        warning = cluster_svc.check_posix_user(session, registry=registry, cluster_name=cluster, username=username)
        cluster_svc.map_account(session, principal=None, cluster_name=cluster, user_name=user, username=username)
        return warning

    warning = _unit(map_)
    registry.close()
    typer.echo(f"{user} runs as {username} on {cluster}")
    if warning:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


@ledger_app.command("check")
def ledger_check() -> None:
    """Recompute balances from the ledger; exit 0 when nothing drifted."""
    drifts = _unit(lambda s: ledger.check(s))
    if not drifts:
        typer.echo("ledger consistent: every balance matches its entries")
        return
    for d in drifts:
        typer.echo(f"allocation {d.allocation_id}: {d.column} stored {d.stored} ≠ ledger {d.from_ledger} (micro-units)")
    raise typer.Exit(1)


@app.command()
def demo(project: Annotated[str, typer.Option()] = "EHPC-AIF-DEMO-001",
         user: Annotated[str, typer.Option()] = "alice",
         url: Annotated[str | None, typer.Option(help="the broker's URL (default: the running "
                                                 "`serve` of this data directory, else the settings)")] = None,
         ) -> None:
    """Create a demo project on the local cluster and print a token and a curl command."""
    import getpass

    settings = _settings()
    posix = getpass.getuser()

    def setup(session: Any) -> None:
        from sqlmodel import select

        from broker.models import Project

        if session.exec(select(Project).where(Project.code == project)).first() is None:
            project_svc.create_project(session, principal=None, body=ProjectIn(
                code=project, title="Demo project", access_mode="playground",
                start_date=date.today().replace(month=1, day=1)))
            project_svc.grant_allocation(session, principal=None, code=project, actor="demo", body=AllocationIn(
                cluster="local", unit="core_hours", amount=1000, account="demo"))
        project_svc.add_member(session, principal=None, code=project, body=MemberIn(user=user, role="pi"))
        cluster_svc.map_account(session, principal=None, cluster_name="local", user_name=user, username=posix)

    _unit(setup, create=True)
    tok = issue_token(settings, sub=user, roles=[])
    qm = issue_token(settings, sub="qm", roles=["quota_manager", "sysadmin"])
    base = url or _served_url(settings) or f"http://{settings.host}:{settings.port}"
    typer.echo(f"""
Demo project {project} on the 'local' cluster (runs jobs as OS user {posix}; development only).
Broker: {base}   (another port? aifa-broker demo --url http://HOST:PORT, or serve first)
For the CLI (aifa-broker job submit|list|show|output ...) as {user}:
  export AIFA_BROKER_URL={base}
  export AIFA_BROKER_TOKEN={tok}
User token for {user} (curl):
  export TOKEN={tok}
Quota manager + sysadmin token:
  export QM_TOKEN={qm}
Submit a job:
  curl -s -X POST {base}/v1/jobs -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
    -d '{{"project": "{project}", "time_limit_minutes": 5,
         "script": "#!/bin/bash\\necho hello from $SLURM_JOB_ID; sleep 2"}}'
Then: curl -s {base}/v1/jobs -H "Authorization: Bearer $TOKEN"   (API docs: {base}/docs)
A job's output: aifa-broker job output ID  (files: {settings.data_dir}/local-jobs/<scheduler job id>/stdout)
""")


if __name__ == "__main__":
    app()


# operator commands live in their own module; importing it registers them on the apps above
from broker import cli_ops  # noqa: E402, F401
