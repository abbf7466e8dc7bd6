"""FastAPI dependencies as ``Annotated`` aliases (settings, engine, session, caller).

The plain lookups are ``async`` so they cost no worker thread. ``SessionDep`` is
a session that has no connection yet: the endpoint's unit of work
(broker/api/unit_of_work.py) takes one in its worker thread, commits and gives it
back there, and closes the session, before the answer is sent. Only a sync endpoint
of a :class:`~broker.api.unit_of_work.UnitOfWorkRoute` may take it, as a parameter of
its own (a route built otherwise is refused)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from broker.auth import GLOBAL_ROLES, Authenticator, Principal
from broker.config import Settings
from broker.db import session_scope
from broker.errors import Unauthenticated
from broker.registry import AdapterRegistry
from broker.services import sessions
from broker.services.common import provision_user


async def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def _engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


async def _registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry  # type: ignore[no-any-return]


async def _session(request: Request) -> Session:
    # a plain dependency, not one with ``yield``: FastAPI runs those through an exit
    # stack and an async context manager (~0.15 M instructions of a ~1.9 M GET). The
    # session has no connection yet; the endpoint's unit of work, which alone may use
    # it (checked when the route is built: broker/api/unit_of_work.py), closes it
    return Session(request.app.state.engine, expire_on_commit=False)


async def _principal(request: Request) -> Principal:
    """The caller. ``async``: a token verified recently by a user already provisioned
    (nearly every request) costs a dictionary lookup on the event loop, not a trip to a
    worker thread; verification (which may fetch an issuer's keys) and the first
    provisioning of a user run in one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("Send a bearer token in the Authorization header.")
    authenticator: Authenticator = request.app.state.authenticator
    principal = authenticator.verified_recently(token)
    if principal is None:
        principal = await run_in_threadpool(authenticator.authenticate, token)
    if _provision_key(principal) not in request.app.state.provisioned:
        await run_in_threadpool(_provision, request.app.state.engine, request.app.state.provisioned, principal)
    return principal


def _provision_key(principal: Principal) -> str:
    return f"{principal.name}\n{','.join(sorted(principal.roles & GLOBAL_ROLES))}"


def _provision(engine: Engine, seen: set[str], principal: Principal) -> None:
    """Users are provisioned on first use: a read, and a write only for a new user
    (once per process per user and global roles: ``seen``). A user seen with other
    global roles than their dashboard sessions hold has those sessions revoked."""
    roles = principal.roles & GLOBAL_ROLES
    key = _provision_key(principal)
    if key in seen:
        return
    with session_scope(engine) as session:
        provision_user(session, principal.name, principal.email)
        sessions.roles_seen(session, user=principal.name, roles=roles)
    seen.add(key)

SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]
RegistryDep = Annotated[AdapterRegistry, Depends(_registry)]
SessionDep = Annotated[Session, Depends(_session)]
PrincipalDep = Annotated[Principal, Depends(_principal)]

#: dependencies that reach outside the request's transaction: an endpoint using one is
#: never rerun after a serialization failure
OUTSIDE_TRANSACTION = (_engine, _registry)
#: the request session's dependency (see :class:`broker.api.unit_of_work.UnitOfWorkRoute`)
REQUEST_SESSION = _session
