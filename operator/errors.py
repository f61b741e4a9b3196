"""Errors of the operator package, and how each one maps onto kopf's retry policy.

Hierarchy::

    OperatorError
    +-- ServingError                 the serving admin API answered or failed unexpectedly
    |   +-- ServingUnavailable       transient: connection refused, timeout, 5xx, 429 -> retry later
    |   +-- AdapterRejected          permanent: the adapter is invalid (400/422) -> Failed, no retry
    |   +-- TenantMissing            the tenant is not registered yet (404 on the tenant) -> retry
    |   +-- AdapterNotFound          serving does not know the adapter (404)
    +-- SpecError                    permanent: the custom resource itself cannot be acted on

Handlers translate: transient -> `kopf.TemporaryError(delay=)`, permanent -> `kopf.PermanentError`.
"""

from __future__ import annotations

__all__ = [
    "AdapterNotFound",
    "AdapterRejected",
    "OperatorError",
    "ServingError",
    "ServingUnavailable",
    "SpecError",
    "TenantMissing",
]


class OperatorError(Exception):
    """Base of every error raised by `lorafleet.operator`."""


class ServingError(OperatorError):
    """The serving admin API failed in a way the operator did not expect."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ServingUnavailable(ServingError):
    """Transient: serving could not be reached or asked us to come back later."""


class AdapterRejected(ServingError):
    """Permanent: serving refused the adapter (validation failed, wrong base model, pickle)."""


class TenantMissing(ServingError):
    """The adapter's tenant is not registered (yet): wait for its Tenant resource."""


class AdapterNotFound(ServingError):
    """Serving does not know the adapter."""


class SpecError(OperatorError):
    """Permanent: the custom resource's spec cannot be acted on (e.g. a name serving refuses)."""
