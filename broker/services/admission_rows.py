"""What admission reads of a project, its caller, a cluster and an allocation: plain
rows, not table models.

Every submission and estimate reads these (broker/services/eligibility.py,
``load_subject``); they are never written back. Loading them as ORM objects cost
more CPU than the rest of the statement (SQLAlchemy builds the row processors of
each entity on every execution, psycopg a description of every column); these are
filled from one Core statement that selects only the columns admission uses.
Attribute names are the tables' column names, so code that also takes a table model
(``Cluster``) reads either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa

from broker.models import Allocation, Cluster, Project, User


@dataclass(frozen=True, slots=True)
class ProjectRow:
    id: int
    code: str
    status: str
    access_mode: str
    start_date: date | None
    end_date: date | None
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UserRow:
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class ClusterRow:
    id: int
    name: str
    adapter: str
    connection: dict[str, Any]
    cost_model: dict[str, Any]
    default_partition: str | None
    poll_interval_seconds: float
    partitions: list[dict[str, Any]]
    state: str
    health_ok: bool | None
    health_detail: str | None
    health_checked_at: datetime | None
    unreachable_since: datetime | None


@dataclass(frozen=True, slots=True)
class AllocationRow:
    id: int
    project_id: int
    unit: str
    granted: int
    charged: int
    reserved: int
    start_date: date | None
    end_date: date | None
    account: str


def _columns(model: Any, row_type: type[Any]) -> list[sa.ColumnElement[Any]]:
    table = model.__table__
    return [table.c[f.name] for f in fields(row_type)]


PROJECT_COLUMNS = _columns(Project, ProjectRow)
USER_COLUMNS = _columns(User, UserRow)
CLUSTER_COLUMNS = _columns(Cluster, ClusterRow)
ALLOCATION_COLUMNS = _columns(Allocation, AllocationRow)


_WIDTHS: dict[type[Any], int] = {}


def _width(row_type: type[Any]) -> int:
    width = _WIDTHS.get(row_type)
    if width is None:
        width = _WIDTHS[row_type] = len(fields(row_type))
    return width


def take(row: Sequence[Any], start: int, row_type: type[Any]) -> tuple[Any, int]:
    """``row_type`` from ``row[start:]`` (its columns in field order), or None when its
    primary key is NULL (an outer join that found nothing); and the next index."""
    end = start + _width(row_type)
    values = row[start:end]
    return (None if values[0] is None else row_type(*values)), end
