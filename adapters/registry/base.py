"""The registry interface: tenants, API keys, adapters and their placement on replicas.

Boundary: an async ABC only; backends live in `sqlite.py` (embedded, no server) and `redis.py`
(clusters). Semantics every backend keeps (the shared component test suite checks them):

- `put_*` create or replace; `put_adapter` and `add_key` raise `NotFound` for an unknown tenant.
- `add_key` raises `AlreadyExists` for a key id or key hash already stored.
- `delete_*` and `revoke_key` raise `NotFound` when absent; `remove_replica` is idempotent
  (replicas vanish without asking). `delete_tenant` removes the tenant's keys and adapters.
- `find_key` returns None for unknown and for revoked keys.
- Lists are sorted: tenants by name, adapters by (tenant, name), keys by (created_at, key_id).
- `generation()` grows on every successful write, so readers may cache until it changes.
- `identity()` is the store's id (set by its first write, kept across restarts of a durable
  store), its generation and the ids it was accepted as a restore of; `accept_restore()` gives
  the store a new id that supersedes the old ones (see `identity.py` for why and the rule).
- A backend that cannot be reached raises `RegistryUnavailable`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..model import AdapterRecord, ApiKey, Tenant
from .identity import RegistryIdentity

__all__ = ["Registry"]


class Registry(ABC):
    # --- tenants ---
    @abstractmethod
    async def put_tenant(self, tenant: Tenant) -> None: ...

    @abstractmethod
    async def get_tenant(self, name: str) -> Tenant | None: ...

    @abstractmethod
    async def list_tenants(self) -> list[Tenant]: ...

    @abstractmethod
    async def delete_tenant(self, name: str) -> None: ...

    # --- keys ---
    @abstractmethod
    async def add_key(self, key: ApiKey) -> None: ...

    @abstractmethod
    async def find_key(self, key_hash: str) -> ApiKey | None: ...

    @abstractmethod
    async def revoke_key(self, tenant: str, key_id: str) -> None: ...

    @abstractmethod
    async def list_keys(self, tenant: str) -> list[ApiKey]: ...

    @abstractmethod
    async def set_key_owner(self, tenant: str, key_id: str, owner: str | None) -> None:
        """Record who manages a key (`ApiKey.owner`); `NotFound` if `tenant` has no such key."""

    # --- adapters ---
    @abstractmethod
    async def put_adapter(self, record: AdapterRecord) -> None: ...

    @abstractmethod
    async def get_adapter(self, tenant: str, name: str) -> AdapterRecord | None: ...

    @abstractmethod
    async def list_adapters(self, tenant: str | None = None) -> list[AdapterRecord]: ...

    @abstractmethod
    async def list_shared_adapters(self) -> list[AdapterRecord]: ...

    @abstractmethod
    async def delete_adapter(self, tenant: str, name: str) -> None: ...

    # --- placement ---
    @abstractmethod
    async def set_replica_adapters(self, replica_id: str, adapter_ids: list[str]) -> None: ...

    @abstractmethod
    async def get_replica_adapters(self) -> dict[str, list[str]]: ...

    @abstractmethod
    async def remove_replica(self, replica_id: str) -> None: ...

    # --- housekeeping ---
    @abstractmethod
    async def generation(self) -> int: ...

    @abstractmethod
    async def identity(self) -> RegistryIdentity:
        """Id, generation and lineage, read together (one snapshot of the store)."""

    @abstractmethod
    async def accept_restore(self, supersede: frozenset[str] = frozenset()) -> RegistryIdentity:
        """Declare the store as it is now the truth: a new id that supersedes the current one,
        ``supersede`` and every id it superseded before; the generation grows."""

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
