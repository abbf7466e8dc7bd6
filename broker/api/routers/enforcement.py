"""/v1/clusters/{name}/enforcement: Slurm-native budget enforcement (sysadmin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from broker.api.deps import PrincipalDep, RegistryDep, SessionDep
from broker.api.unit_of_work import UnitOfWorkRoute, writes
from broker.services import enforcement as svc

router = APIRouter(prefix="/v1/clusters", tags=["enforcement"], route_class=UnitOfWorkRoute)


@router.get("/{name}/enforcement")
@writes  # stores the report as the cluster's enforcement status
def drift(name: str, principal: PrincipalDep, session: SessionDep, registry: RegistryDep) -> dict[str, Any]:
    """Drift report: what a sync would change in the cluster's accounting (changes nothing)."""
    return svc.sync_cluster(session, principal=principal, registry=registry, name=name, dry_run=True).as_dict()


@router.post("/{name}/enforcement/sync")
def sync(name: str, principal: PrincipalDep, session: SessionDep, registry: RegistryDep,
         dry_run: bool = False) -> dict[str, Any]:
    """Apply the plan (409 ``enforcement_disabled`` unless the cluster enforces budgets)."""
    return svc.sync_cluster(session, principal=principal, registry=registry, name=name,
                            dry_run=dry_run).as_dict()
