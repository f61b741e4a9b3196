"""Where a Tenant's settings and API key hashes go: the LoRAFleet registry.

Boundary: the only place the operator writes tenants and keys. Only key *hashes* pass through
here (`lorafleet.adapters.keys.hash_key`); the plaintext never leaves the Secret handler.
`MemoryTenantStore` is for tests and dry runs; `RegistryTenantStore` wraps `lorafleet.adapters`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ServingUnavailable, SpecError

if TYPE_CHECKING:
    from lorafleet.adapters.registry import Registry

__all__ = ["OPERATOR_KEY_OWNER", "MemoryTenantStore", "RegistryTenantStore", "TenantStore"]

# `ApiKey.owner` of the keys this operator registers. Keys made through the admin API (owner
# None) are never listed to the Tenant sync, so it cannot revoke them.
OPERATOR_KEY_OWNER = "operator"


class TenantStore(Protocol):
    async def upsert_tenant(self, name: str, display_name: str,
                            quota: Mapping[str, int | None]) -> None: ...

    async def delete_tenant(self, name: str) -> None: ...

    async def list_keys(self, tenant: str) -> dict[str, str]:
        """Active (not revoked) keys of `tenant` that the operator manages: key_id -> key_hash."""
        ...

    async def add_key(self, tenant: str, key_id: str, key_hash: str) -> None: ...

    async def revoke_key(self, tenant: str, key_id: str) -> None: ...


class MemoryTenantStore:
    """An in-process store with the same behaviour: idempotent adds and revokes."""

    def __init__(self) -> None:
        self.tenants: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, dict[str, str]] = {}

    async def upsert_tenant(self, name: str, display_name: str,
                            quota: Mapping[str, int | None]) -> None:
        self.tenants[name] = {"display_name": display_name, "quota": dict(quota)}
        self.keys.setdefault(name, {})

    async def delete_tenant(self, name: str) -> None:
        self.tenants.pop(name, None)
        self.keys.pop(name, None)

    async def list_keys(self, tenant: str) -> dict[str, str]:
        return dict(self.keys.get(tenant, {}))

    async def add_key(self, tenant: str, key_id: str, key_hash: str) -> None:
        self.keys.setdefault(tenant, {})[key_id] = key_hash

    async def revoke_key(self, tenant: str, key_id: str) -> None:
        self.keys.get(tenant, {}).pop(key_id, None)


class RegistryTenantStore:
    """Tenants and key hashes written straight into the LoRAFleet registry (SQLite or Redis).

    The admin API can only *generate* keys; keys from Secrets are brought by the user, so the
    operator writes their hashes itself. Registry outages become `ServingUnavailable` (retried).
    """

    def __init__(self, registry: Registry, clock: Callable[[], float] = time.time) -> None:
        self._registry = registry
        self._clock = clock

    @classmethod
    def from_url(cls, url: str) -> RegistryTenantStore:
        from lorafleet.adapters.registry import open_registry

        return cls(open_registry(url))

    async def close(self) -> None:
        await self._registry.close()

    async def upsert_tenant(self, name: str, display_name: str,
                            quota: Mapping[str, int | None]) -> None:
        from lorafleet.adapters.model import Quota, Tenant

        async with self._errors():
            existing = await self._registry.get_tenant(name)
            tenant = Tenant(name=name, display_name=display_name, quota=Quota(**quota),
                            created_at=existing.created_at if existing else self._clock())
            if existing != tenant:
                await self._registry.put_tenant(tenant)

    async def delete_tenant(self, name: str) -> None:
        from lorafleet.adapters.errors import NotFound

        async with self._errors():
            with contextlib.suppress(NotFound):
                await self._registry.delete_tenant(name)

    async def list_keys(self, tenant: str) -> dict[str, str]:
        async with self._errors():
            return {k.key_id: k.key_hash for k in await self._registry.list_keys(tenant)
                    if not k.revoked and k.owner == OPERATOR_KEY_OWNER}

    async def add_key(self, tenant: str, key_id: str, key_hash: str) -> None:
        """Register a key from a Secret as the operator's. The same key already active for
        this tenant (made through the admin API, or registered before keys had owners) is
        adopted: it is in the Secret now, so the Secret decides its life."""
        from lorafleet.adapters.errors import AlreadyExists
        from lorafleet.adapters.model import ApiKey

        async with self._errors():
            try:
                await self._registry.add_key(ApiKey(
                    key_id=key_id, tenant=tenant, key_hash=key_hash, created_at=self._clock(),
                    owner=OPERATOR_KEY_OWNER))
                return
            except AlreadyExists as exc:
                existing = next((k for k in await self._registry.list_keys(tenant)
                                 if k.key_id == key_id), None)
                if existing is None or existing.revoked or existing.key_hash != key_hash:
                    # A revoked key stays revoked (the registry keeps its id and hash).
                    raise SpecError(f"API key {key_id} was used before (revoked or another "
                                    "tenant's): put a new key in the Secret") from exc
            await self._registry.set_key_owner(tenant, key_id, OPERATOR_KEY_OWNER)

    async def revoke_key(self, tenant: str, key_id: str) -> None:
        from lorafleet.adapters.errors import NotFound

        async with self._errors():
            with contextlib.suppress(NotFound):  # already gone is what we want
                await self._registry.revoke_key(tenant, key_id)

    def _errors(self) -> Any:
        return _RegistryErrors()


class _RegistryErrors:
    """Turn `RegistryUnavailable` into the operator's transient error."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        from lorafleet.adapters.errors import RegistryUnavailable

        if isinstance(exc, RegistryUnavailable):
            raise ServingUnavailable(f"registry unavailable: {exc}") from exc
        return False
