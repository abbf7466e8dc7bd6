"""Domain exceptions of the broker core, mapped to problem+json in one place.

Hierarchy (all carry ``status``, a stable ``code`` and a human ``detail``)::

    BrokerError
    ├── Unauthenticated        401 unauthenticated
    ├── Forbidden              403 forbidden
    ├── EligibilityDenied      403 project_inactive / no_allocation / ... (first denial)
    ├── NotFound               404 not_found
    ├── Conflict               409 (quota_exceeded, idempotency_in_progress, conflict)
    ├── PayloadTooLarge        413 payload_too_large
    ├── InvalidRequest         422 validation_error / idempotency_conflict / ...
    │   └── DirectiveRefused   422 unsupported_directive (names the script line)
    ├── RateLimited            429 rate_limited
    └── ClusterUnavailable     503 cluster_unavailable

``Replayed`` carries a stored error answer of an ``Idempotency-Key`` (any status).
"""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.extra = extra


class Unauthenticated(BrokerError):
    status, code, title = 401, "unauthenticated", "Unauthenticated"


class Forbidden(BrokerError):
    status, code, title = 403, "forbidden", "Forbidden"


class EligibilityDenied(BrokerError):
    status, code, title = 403, "not_eligible", "Not eligible"


class NotFound(BrokerError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(BrokerError):
    status, code, title = 409, "conflict", "Conflict"


class QuotaExceeded(Conflict):
    code, title = "quota_exceeded", "Quota exceeded"


class PayloadTooLarge(BrokerError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class InvalidRequest(BrokerError):
    status, code, title = 422, "validation_error", "Invalid request"


class DirectiveRefused(InvalidRequest):
    """A ``#SBATCH`` line the broker cannot price or must not honour; names the line."""

    code, title = "unsupported_directive", "Unsupported directive"


class RateLimited(BrokerError):
    status, code, title = 429, "rate_limited", "Too many requests"


class ClusterUnavailable(BrokerError):
    status, code, title = 503, "cluster_unavailable", "Cluster unavailable"


class Replayed(BrokerError):
    """An error answer stored for an ``Idempotency-Key``, given again as it was first given."""

    def __init__(self, *, status: int, code: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail, code=code, **extra)
        self.status, self.title = status, title
