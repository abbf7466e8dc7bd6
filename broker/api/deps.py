"""FastAPI dependencies as ``Annotated`` aliases (settings, engine, session, caller)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.auth import Authenticator, Principal
from broker.config import Settings
from broker.db import session_scope
from broker.errors import Unauthenticated
from broker.models import utcnow
from broker.registry import AdapterRegistry
from broker.services.common import get_or_create_user


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def _registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry  # type: ignore[no-any-return]


def _session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.engine) as session:
        yield session


def _principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Send a bearer token in the Authorization header.")
    authenticator: Authenticator = request.app.state.authenticator
    principal = authenticator.authenticate(token.strip())
    _provision(request.app.state.engine, request.app.state.provisioned, principal)
    return principal


def _provision(engine: Engine, seen: set[str], principal: Principal) -> None:
    """Users are provisioned on first use (once per process: ``seen``)."""
    if principal.name in seen:
        return
    with session_scope(engine) as session:
        user = get_or_create_user(session, principal.name, principal.email)
        user.last_seen_at = utcnow()
        session.add(user)
    seen.add(principal.name)

SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]
RegistryDep = Annotated[AdapterRegistry, Depends(_registry)]
SessionDep = Annotated[Session, Depends(_session)]
PrincipalDep = Annotated[Principal, Depends(_principal)]
