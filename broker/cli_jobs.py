"""``aifa-broker job ...``: the user's side of the CLI, over HTTP with a token.

The broker's address and the token come from ``--url``/``--token`` or
``AIFA_BROKER_URL``/``AIFA_BROKER_TOKEN``. Output is JSON (``--json``) or a short
human summary. Errors print the problem's code and sentence and exit 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from broker.client import BrokerAPIError, BrokerClient

job_app = typer.Typer(help="Submit and follow jobs through a broker (users).", no_args_is_help=True)
T = TypeVar("T")

Url = Annotated[str, typer.Option(envvar="AIFA_BROKER_URL", help="broker base URL")]
Token = Annotated[str, typer.Option(envvar="AIFA_BROKER_TOKEN", help="bearer token", show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="print the API's JSON")]


@contextmanager
def _client(url: str, token: str) -> Iterator[BrokerClient]:
    if not token:
        typer.secho("error: no token: pass --token or set AIFA_BROKER_TOKEN", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    with BrokerClient(url, token) as client:
        try:
            yield client
        except BrokerAPIError as exc:
            hint = " (set AIFA_BROKER_URL or --url to the broker's address)" if exc.code == "connection_failed" else ""
            typer.secho(f"error: {exc.detail} [{exc.code}]{hint}", fg=typer.colors.RED, err=True)
            for problem in exc.problem.get("errors", [])[:20]:
                typer.secho(f"  {problem.get('field')}: {problem.get('message')}", err=True)
            for cand in exc.problem.get("candidates", [])[:50]:  # cluster auto: why not each one
                why = "; ".join(f"{d['code']}: {d['detail']}" for d in cand.get("denials", []))
                typer.secho(f"  {cand.get('cluster')}: {why}", err=True)
            raise typer.Exit(1) from exc


def _show(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    cost = job["estimated_cost"]
    charged = job.get("charged")
    typer.echo(f"{job['id']}  {job['state']:<13} {job['project']} on {job['cluster']}/{job.get('partition') or '-'}"
               f"  scheduler id {job.get('scheduler_job_id') or '-'}  estimate {cost['amount']} {cost['unit']}"
               + (f"  charged {charged['amount']}" if charged else "")
               + (f"  exit {job['exit_code']}" if job.get("exit_code") is not None else ""))
    if job.get("placement"):
        typer.echo(f"  placed: {job['placement']['reason']}")
    array = job.get("array")
    if array:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(array["counts"].items()))
        throttle = f", at most {array['max_running']} at once" if array.get("max_running") else ""
        typer.echo(f"  array {array['spec']}: {array['tasks']} tasks{throttle} — {counts or 'no tasks yet'}")


def _environment(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _request(script: Path, project: str, time_limit: int | None, cluster: str | None, partition: str | None,
             name: str | None, nodes: int | None, cpus: int | None, gpus: int | None, mem: int | None,
             env: list[str], array: str | None = None) -> dict[str, Any]:
    """The request body: the script as it is (the broker reads its #SBATCH lines) and
    only the options given on this command line — they override the script's
    directives, as sbatch's command line does."""
    body: dict[str, Any] = {"project": project, "script": script.read_text()}
    if env:
        body["environment"] = _environment(env)
    optional = {"time_limit_minutes": time_limit, "cluster": cluster, "partition": partition, "name": name,
                "nodes": nodes, "cpus_per_task": cpus, "gpus_per_node": gpus, "memory_per_node_mb": mem,
                "array": array}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


Script = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="job script")]
Project = Annotated[str, typer.Option("--project", "-p")]
Time = Annotated[int | None, typer.Option("--time", "-t", help="time limit in minutes (else #SBATCH --time)")]
ClusterOpt = Annotated[str | None, typer.Option(
    help="cluster name, or 'auto': the broker picks where the project may run it soonest within budget")]


@job_app.command("submit")
def submit(script: Script, project: Project, url: Url = "http://127.0.0.1:8080", token: Token = "",
           time: Time = None, cluster: ClusterOpt = None,
           partition: Annotated[str | None, typer.Option()] = None,
           name: Annotated[str | None, typer.Option()] = None, nodes: Annotated[int | None, typer.Option()] = None,
           cpus: Annotated[int | None, typer.Option(help="CPUs per task")] = None,
           gpus: Annotated[int | None, typer.Option(help="GPUs per node")] = None,
           mem: Annotated[int | None, typer.Option(help="memory per node, MB")] = None,
           env: Annotated[list[str] | None, typer.Option(help="NAME=VALUE, repeatable")] = None,
           array: Annotated[str | None, typer.Option("--array", "-a", help="job array, as sbatch (0-15:2%4)")] = None,
           wait: Annotated[bool, typer.Option(help="wait until the job is settled")] = False,
           as_json: AsJson = False) -> None:
    """Submit SCRIPT (retried safely with an idempotency key). Its #SBATCH lines are
    read by the broker; options given here override them."""
    body = _request(script, project, time, cluster, partition, name, nodes, cpus, gpus, mem, env or [], array)
    with _client(url, token) as client:
        job = client.submit(**body)
        _show(client.wait(job["id"]) if wait else job, as_json)


@job_app.command("estimate")
def estimate(script: Script, project: Project, url: Url = "http://127.0.0.1:8080", token: Token = "",
             time: Time = None, cluster: ClusterOpt = None,
             partition: Annotated[str | None, typer.Option()] = None,
             nodes: Annotated[int | None, typer.Option()] = None,
             cpus: Annotated[int | None, typer.Option()] = None,
             gpus: Annotated[int | None, typer.Option()] = None) -> None:
    """Would SCRIPT be accepted, and what would it cost? Exit 1 when it would be refused."""
    body = _request(script, project, time, cluster, partition, None, nodes, cpus, gpus, None, [])
    with _client(url, token) as client:
        verdict = client.estimate(**body)
    typer.echo(json.dumps(verdict, indent=2))
    if not verdict["allowed"]:
        raise typer.Exit(1)


@job_app.command("list")
def list_jobs(url: Url = "http://127.0.0.1:8080", token: Token = "",
              project: Annotated[str | None, typer.Option()] = None,
              state: Annotated[str | None, typer.Option()] = None,
              limit: Annotated[int, typer.Option(help="at most this many")] = 50, as_json: AsJson = False) -> None:
    """Your jobs (a PI: the project's; a quota manager: all), newest first."""
    filters = {k: v for k, v in {"project": project, "state": state}.items() if v}
    with _client(url, token) as client:
        jobs = [j for _, j in zip(range(limit), client.jobs(page_size=min(limit, 500), **filters), strict=False)]
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    for job in jobs:
        _show(job, False)


def _one(fn: Callable[[BrokerClient], T], url: str, token: str) -> T:
    with _client(url, token) as client:
        return fn(client)
    raise AssertionError("unreachable")


@job_app.command("show")
def show(job_id: str, url: Url = "http://127.0.0.1:8080", token: Token = "", as_json: AsJson = False) -> None:
    """One job."""
    _show(_one(lambda c: c.job(job_id), url, token), as_json)


@job_app.command("cancel")
def cancel(job_id: str, url: Url = "http://127.0.0.1:8080", token: Token = "",
           task: Annotated[int | None, typer.Option(help="an array job: cancel only this task")] = None) -> None:
    """Cancel a job (it becomes CANCELLED when the scheduler confirms); of an array
    job, the whole array, or one task with --task."""
    if task is None:
        _show(_one(lambda c: c.cancel(job_id), url, token), False)
        return
    done = _one(lambda c: c.cancel_task(job_id, task), url, token)
    typer.echo(f"{job_id} task {done['task']}  {done['state']}  (cancel requested)")


@job_app.command("tasks")
def tasks(job_id: str, url: Url = "http://127.0.0.1:8080", token: Token = "", as_json: AsJson = False) -> None:
    """An array job's tasks: state, exit code and charge of each."""
    items = _one(lambda c: c.tasks(job_id), url, token)
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for t in items:
        charged = t.get("charged")
        typer.echo(f"{t['task']:>7}  {t['state']:<13} {t.get('scheduler_job_id') or '-':<14}"
                   + (f"  exit {t['exit_code']}" if t.get("exit_code") is not None else "")
                   + (f"  charged {charged['amount']} {charged['unit']}" if charged else ""))


@job_app.command("output")
def output(job_id: str, url: Url = "http://127.0.0.1:8080", token: Token = "",
           stderr: Annotated[bool, typer.Option("--stderr")] = False,
           tail: Annotated[int, typer.Option(help="bytes")] = 65536,
           follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
           interval: Annotated[float, typer.Option(help="seconds between reads with --follow")] = 2.0) -> None:
    """The tail of the job's stdout (or stderr); with --follow, its output as it grows."""
    stream = "stderr" if stderr else "stdout"
    if not follow:
        text, where = _one(lambda c: c.output_and_location(job_id, stream=stream, tail=tail), url, token)
        if where:
            typer.echo(f"# {stream} file: {where}", err=True)
        typer.echo(text, nl=False)
        return
    with _client(url, token) as client:
        for chunk in client.follow_output(job_id, stream=stream, interval=interval):
            typer.echo(chunk, nl=False)


#: ``job wait`` exit status when the wait itself timed out (as timeout(1) does)
WAIT_TIMED_OUT = 124


def exit_status(job: dict[str, Any]) -> int:
    """The shell exit status for a finished job: its exit code (a job killed by
    signal N reports 128+N); 1 when it ended badly without one (cancelled before
    start, submit failed)."""
    code = job.get("exit_code")
    if isinstance(code, int):
        return code if 0 <= code <= 255 else 1
    return 0 if job.get("state") == "COMPLETED" else 1


@job_app.command("wait")
def wait(job_id: str, url: Url = "http://127.0.0.1:8080", token: Token = "",
         timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 86400.0,
         as_json: AsJson = False) -> None:
    """Wait until the job has ended and been settled; exit with the job's exit code
    (124 if --timeout passed first)."""
    with _client(url, token) as client:
        try:
            job = client.wait(job_id, timeout=timeout)
        except TimeoutError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(WAIT_TIMED_OUT) from exc
    _show(job, as_json)
    raise typer.Exit(exit_status(job))


def _budget_line(row: dict[str, Any]) -> str:
    used = row.get("percent_used")
    return (f"{row['project']:<22} {row['cluster']:<12} {row['unit']:<13} {row['granted']:>12g} "
            f"{row['used']:>11g} {row['reserved']:>10g} {row['remaining']:>12g} "
            f"{'-' if used is None else f'{used:.1f}%':>7} {row['burn_rate_per_day']:>10g} "
            f"{row.get('projected_exhaustion') or row.get('forecast') or '-':>14}")


def budget(url: Url = "http://127.0.0.1:8080", token: Token = "",
           window: Annotated[int, typer.Option(help="days the burn rate is measured over")] = 14,
           as_json: AsJson = False) -> None:
    """Your projects' allocations: granted, used, reserved, remaining, burn rate per day
    and the projected exhaustion date (or why there is none: not_burning, not_before_end, ...)."""
    answer = _one(lambda c: c.budget(window_days=window), url, token)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    rows = answer["allocations"]
    if not rows:
        typer.echo("You are not a member of any project with an allocation.")
        return
    typer.echo(f"{'PROJECT':<22} {'CLUSTER':<12} {'UNIT':<13} {'GRANTED':>12} {'USED':>11} {'RESERVED':>10} "
               f"{'REMAINING':>12} {'USED%':>7} {'BURN/DAY':>10} {'RUNS OUT':>14}")
    for row in rows:
        typer.echo(_budget_line(row))
