"""/v1/clusters: registry, health, accounts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from sqlmodel import col, select

from broker.api.deps import PrincipalDep, RegistryDep, SessionDep, SettingsDep
from broker.api.unit_of_work import UnitOfWorkRoute, writes
from broker.models import Cluster
from broker.schemas import NAME_RE, AccountIn, AccountOut, ClusterIn, ClusterOut, ClusterPatch, HealthOut
from broker.services import clusters as svc
from broker.services.common import get_cluster, require_role

router = APIRouter(prefix="/v1/clusters", tags=["clusters"], route_class=UnitOfWorkRoute)


@router.get("", response_model=list[ClusterOut])
def list_clusters(_: PrincipalDep, session: SessionDep) -> list[ClusterOut]:
    return [svc.cluster_out(c) for c in session.exec(select(Cluster).order_by(col(Cluster.name))).all()]


@router.post("", response_model=ClusterOut, status_code=201)
def add_cluster(body: ClusterIn, principal: PrincipalDep, session: SessionDep, registry: RegistryDep,
                settings: SettingsDep) -> ClusterOut:
    default_poll = settings.local_cluster_poll_seconds if body.adapter == "local" else settings.slurm_poll_seconds
    return svc.cluster_out(svc.register_cluster(session, principal=principal, registry=registry, body=body,
                                                default_poll=default_poll))


@router.get("/{name}", response_model=ClusterOut)
def get_one(name: str, _: PrincipalDep, session: SessionDep) -> ClusterOut:
    return svc.cluster_out(get_cluster(session, name))


@router.patch("/{name}", response_model=ClusterOut)
def patch(name: str, body: ClusterPatch, principal: PrincipalDep, session: SessionDep,
          registry: RegistryDep) -> ClusterOut:
    return svc.cluster_out(svc.update_cluster(session, principal=principal, registry=registry,
                                              name=name, body=body))


@router.delete("/{name}", status_code=204)
def delete(name: str, principal: PrincipalDep, session: SessionDep, registry: RegistryDep) -> Response:
    svc.delete_cluster(session, principal=principal, registry=registry, name=name)
    return Response(status_code=204)


@router.get("/{name}/health", response_model=HealthOut)
@writes  # records the cluster's health
def health(name: str, _: PrincipalDep, session: SessionDep, registry: RegistryDep) -> HealthOut:
    """A live check through the adapter."""
    h = svc.check_health(session, registry=registry, name=name)
    return HealthOut(cluster=name, ok=h.ok, detail=h.detail, latency_ms=h.latency_ms, checks=dict(h.checks))


@router.get("/{name}/accounts", response_model=list[AccountOut])
def list_accounts(name: str, principal: PrincipalDep, session: SessionDep) -> list[AccountOut]:
    return svc.list_accounts(session, principal=principal, cluster_name=name)


@router.put("/{name}/accounts/{user}", response_model=AccountOut)
def map_account(name: str, user: Annotated[str, Path(pattern=NAME_RE)], body: AccountIn, principal: PrincipalDep,
                session: SessionDep, registry: RegistryDep) -> AccountOut:
    require_role(principal, "sysadmin")  # before asking the cluster anything
    warning = svc.check_posix_user(session, registry=registry, cluster_name=name, username=body.username)
    out = svc.map_account(session, principal=principal, cluster_name=name, user_name=user,
                          username=body.username)
    return out.model_copy(update={"warnings": [warning] if warning else []})


@router.delete("/{name}/accounts/{user}", status_code=204)
def unmap_account(name: str, user: str, principal: PrincipalDep, session: SessionDep) -> Response:
    svc.remove_account(session, principal=principal, cluster_name=name, user_name=user)
    return Response(status_code=204)
