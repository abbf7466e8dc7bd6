"""API version discovery from slurmrestd's ``/openapi/v3`` document.

The version is never taken from configuration alone: the adapter reads which
versions the daemon serves (a version counts when both its ``slurm/.../job/submit``
and ``slurmdb/.../jobs`` paths are present), intersects them with the versions it
has a translation layer for and with the optional ``api_version`` setting, and
takes the newest. The same document tells which job description fields the
chosen version accepts, so a request field that version would silently ignore
is caught before submitting.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters.slurm_rest.layers import version_key
from broker.adapter import AdapterConfigError

_SUBMIT_RE = re.compile(r"^/slurm/(v\d+\.\d+\.\d+)/job/submit/?$")
_DB_JOBS_RE = re.compile(r"^/slurmdb/(v\d+\.\d+\.\d+)/jobs/?$")


@dataclass(frozen=True)
class Discovery:
    """What the served OpenAPI document says about one chosen version."""

    version: str
    served: tuple[str, ...]
    #: job description fields the version accepts; None when the schema is unreadable
    job_fields: frozenset[str] | None
    slurm_release: str | None = None


def served_versions(doc: Mapping[str, Any]) -> tuple[str, ...]:
    """Versions with both a submit and an accounting-jobs path, oldest first."""
    paths = doc.get("paths")
    if not isinstance(paths, Mapping):
        return ()
    submit = {m.group(1) for p in paths if isinstance(p, str) and (m := _SUBMIT_RE.match(p))}
    db_jobs = {m.group(1) for p in paths if isinstance(p, str) and (m := _DB_JOBS_RE.match(p))}
    return tuple(sorted(submit & db_jobs, key=version_key))


def choose_version(served: Sequence[str], supported: Collection[str], allowed: Sequence[str] = ()) -> str:
    """The newest version served, supported and (when ``allowed`` is given) allowed."""
    candidates = [v for v in served if v in supported and (not allowed or v in allowed)]
    if candidates:
        return max(candidates, key=version_key)
    served_text = ", ".join(served) or "none"
    supported_text = ", ".join(sorted(supported, key=version_key))
    if allowed:
        raise AdapterConfigError(
            f"slurm_rest: api_version {', '.join(allowed)} is not among the versions this "
            f"slurmrestd serves and the adapter supports (served: {served_text}; "
            f"supported: {supported_text})",
            code="unsupported_api_version",
        )
    raise AdapterConfigError(
        f"slurm_rest: slurmrestd serves no API version this adapter supports "
        f"(served: {served_text}; supported: {supported_text})",
        code="unsupported_api_version",
    )


def discover(doc: Mapping[str, Any], supported: Collection[str], allowed: Sequence[str] = ()) -> Discovery:
    """Choose the version and read its job description fields from ``doc``."""
    served = served_versions(doc)
    version = choose_version(served, supported, allowed)
    return Discovery(
        version=version,
        served=served,
        job_fields=job_description_fields(doc, version),
        slurm_release=_release(doc),
    )


def job_description_fields(doc: Mapping[str, Any], version: str) -> frozenset[str] | None:
    """Property names of the ``job`` object of ``version``'s submit request body."""
    paths = doc.get("paths")
    if not isinstance(paths, Mapping):
        return None
    operation = _submit_operation(paths, version)
    schema = _dig(operation, "requestBody", "content", "application/json", "schema")
    body = _resolve(doc, schema)
    job = _resolve(doc, _dig(body, "properties", "job"))
    properties = _dig(job, "properties")
    if not isinstance(properties, Mapping) or not properties:
        return None
    return frozenset(str(k) for k in properties)


def _submit_operation(paths: Mapping[str, Any], version: str) -> Any:
    for suffix in ("", "/"):
        operation = _dig(paths, f"/slurm/{version}/job/submit{suffix}", "post")
        if operation is not None:
            return operation
    return None


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _resolve(doc: Mapping[str, Any], schema: Any, depth: int = 0) -> Any:
    """Follow ``$ref`` (local ``#/components/schemas/...``) links."""
    while isinstance(schema, Mapping) and "$ref" in schema and depth < 16:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return None
        schema = _dig(doc, *ref[2:].split("/"))
        depth += 1
    return schema


def _release(doc: Mapping[str, Any]) -> str | None:
    """``Slurm-24.11.5&...`` from ``info.version`` (22.05 has only the API version)."""
    version = _dig(doc, "info", "version")
    if isinstance(version, str) and version.startswith("Slurm-"):
        return version.split("&", 1)[0].removeprefix("Slurm-")
    return None
