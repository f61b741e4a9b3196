"""Where a Tenant's settings and API key hashes go: the LoRAFleet registry.

Boundary: the only place the operator writes tenants and keys. Only key *hashes* pass through
here (`lorafleet.adapters.keys.hash_key`); the plaintext never leaves the Secret handler.
`MemoryTenantStore` is for tests and dry runs; `RegistryTenantStore` wraps `lorafleet.adapters`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["MemoryTenantStore", "TenantStore"]


class TenantStore(Protocol):
    async def upsert_tenant(self, name: str, display_name: str,
                            quota: Mapping[str, int | None]) -> None: ...

    async def delete_tenant(self, name: str) -> None: ...

    async def list_keys(self, tenant: str) -> dict[str, str]:
        """Active (not revoked) keys of `tenant`: key_id -> key_hash."""
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
