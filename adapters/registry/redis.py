"""Registry on Redis (`redis.asyncio`), for clusters: several ingresses and the operator share it.

Boundary: storage only. Keys (prefix `lorafleet:` by default, configurable so tests and several
deployments can share one server):

    {ns}:gen                      integer, INCR'd inside every write transaction
    {ns}:id                       the store's random id, SET NX by every write transaction
    {ns}:supersedes               set of ids this store was accepted as a restore of
    {ns}:tenants                  set of tenant names
    {ns}:tenant:{name}            JSON Tenant
    {ns}:tenant:{name}:keys       set of key ids
    {ns}:tenant:{name}:adapters   hash adapter name -> JSON AdapterRecord
    {ns}:key:{key_id}             JSON ApiKey
    {ns}:keyhash:{sha256}         key id (the lookup the ingress does per request)
    {ns}:shared                   set of "tenant/name" of shared adapters
    {ns}:replicas                 hash replica id -> JSON list of adapter ids

Writes that touch several keys run in MULTI/EXEC; writes that depend on a read (the tenant must
exist, the key must not) WATCH the keys they read and retry if another client changed them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError
from redis.retry import Retry

from ..errors import AlreadyExists, NotFound, RegistryUnavailable
from ..model import AdapterRecord, ApiKey, Tenant
from .base import Registry
from .identity import NO_ID, RegistryIdentity

__all__ = ["RedisRegistry"]

T = TypeVar("T")
_MAX_WATCH_RETRIES = 50


def _strs(values: Iterable[bytes | str]) -> list[str]:
    """Sorted str values (the client decodes responses; redis-py's types do not know that)."""
    return sorted(v.decode() if isinstance(v, bytes) else v for v in values)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisRegistry(Registry):
    def __init__(self, url: str, *, namespace: str = "lorafleet",
                 connect_timeout_s: float = 2.0, timeout_s: float = 5.0) -> None:
        self.url = url
        self.ns = namespace
        # Few, short retries: an unreachable registry must surface as 503 quickly, not hang.
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=connect_timeout_s,
            socket_timeout=timeout_s, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2))

    # --- plumbing ---

    def _k(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise RegistryUnavailable(
                f"Redis registry at {_redact(self.url)} is unreachable: {exc}") from exc

    async def _transaction(self, watch: list[str],
                           body: Callable[[Pipeline], Awaitable[T]]) -> T:
        """WATCH `watch`, let `body` read (immediate mode) then queue writes after `multi()`;
        EXEC with a generation bump; retry when a watched key changed under us."""
        async with self._guard():
            for _ in range(_MAX_WATCH_RETRIES):
                async with self._redis.pipeline(transaction=True) as pipe:
                    try:
                        if watch:
                            await pipe.watch(*watch)
                        result = await body(pipe)
                        pipe.incr(self._k("gen"))
                        # The id is born with the store's first write (identity.py).
                        pipe.set(self._k("id"), "reg-" + secrets.token_hex(16), nx=True)
                        await pipe.execute()
                        return result
                    except WatchError:
                        continue
            raise RegistryUnavailable("Redis registry: too much contention, gave up retrying")

    # --- tenants ---

    async def put_tenant(self, tenant: Tenant) -> None:
        async def body(pipe: Pipeline) -> None:
            pipe.multi()
            pipe.sadd(self._k("tenants"), tenant.name)
            pipe.set(self._k("tenant", tenant.name), json.dumps(tenant.to_dict()))

        await self._transaction([], body)

    async def get_tenant(self, name: str) -> Tenant | None:
        async with self._guard():
            raw = await self._redis.get(self._k("tenant", name))
        return Tenant.from_dict(json.loads(raw)) if raw else None

    async def list_tenants(self) -> list[Tenant]:
        async with self._guard():
            names = _strs(await self._redis.smembers(self._k("tenants")))
            raws = await self._redis.mget([self._k("tenant", n) for n in names]) if names else []
        return [Tenant.from_dict(json.loads(r)) for r in raws if r]

    async def delete_tenant(self, name: str) -> None:
        keys_set = self._k("tenant", name, "keys")
        adapters = self._k("tenant", name, "adapters")

        async def body(pipe: Pipeline) -> None:
            if not await pipe.exists(self._k("tenant", name)):
                raise NotFound(f"tenant {name!r} does not exist")
            key_ids = _strs(await pipe.smembers(keys_set))
            key_raws = await pipe.mget([self._k("key", k) for k in key_ids]) if key_ids else []
            adapter_names = _strs(await pipe.hkeys(adapters))
            pipe.multi()
            for raw in key_raws:
                if raw:
                    pipe.delete(self._k("keyhash", json.loads(raw)["key_hash"]))
            for key_id in key_ids:
                pipe.delete(self._k("key", key_id))
            for adapter in adapter_names:
                pipe.srem(self._k("shared"), f"{name}/{adapter}")
            pipe.delete(keys_set, adapters, self._k("tenant", name))
            pipe.srem(self._k("tenants"), name)

        await self._transaction([self._k("tenant", name), keys_set, adapters], body)

    # --- keys ---

    async def add_key(self, key: ApiKey) -> None:
        key_k, hash_k = self._k("key", key.key_id), self._k("keyhash", key.key_hash)
        tenant_k = self._k("tenant", key.tenant)

        async def body(pipe: Pipeline) -> None:
            if not await pipe.exists(tenant_k):
                raise NotFound(f"tenant {key.tenant!r} does not exist")
            if await pipe.exists(key_k, hash_k):
                raise AlreadyExists(f"key {key.key_id} (or its hash) already exists")
            pipe.multi()
            pipe.set(key_k, json.dumps(key.to_dict()))
            pipe.set(hash_k, key.key_id)
            pipe.sadd(self._k("tenant", key.tenant, "keys"), key.key_id)

        await self._transaction([tenant_k, key_k, hash_k], body)

    async def find_key(self, key_hash: str) -> ApiKey | None:
        async with self._guard():
            key_id = await self._redis.get(self._k("keyhash", key_hash))
            raw = await self._redis.get(self._k("key", str(key_id))) if key_id else None
        if not raw:
            return None
        key = ApiKey.from_dict(json.loads(raw))
        return None if key.revoked else key

    async def revoke_key(self, tenant: str, key_id: str) -> None:
        await self._update_key(tenant, key_id, {"revoked": True})

    async def set_key_owner(self, tenant: str, key_id: str, owner: str | None) -> None:
        await self._update_key(tenant, key_id, {"owner": owner})

    async def _update_key(self, tenant: str, key_id: str, changes: dict[str, Any]) -> None:
        """Set fields of a tenant's key in one transaction; NotFound if it is not that tenant's."""
        key_k = self._k("key", key_id)

        async def body(pipe: Pipeline) -> None:
            raw = await pipe.get(key_k)
            key = ApiKey.from_dict(json.loads(raw)) if raw else None
            if key is None or key.tenant != tenant:
                raise NotFound(f"key {key_id!r} of tenant {tenant!r} does not exist")
            pipe.multi()
            pipe.set(key_k, json.dumps({**key.to_dict(), **changes}))

        await self._transaction([key_k], body)

    async def list_keys(self, tenant: str) -> list[ApiKey]:
        async with self._guard():
            ids = _strs(await self._redis.smembers(self._k("tenant", tenant, "keys")))
            raws = await self._redis.mget([self._k("key", i) for i in ids]) if ids else []
        keys = [ApiKey.from_dict(json.loads(r)) for r in raws if r]
        return sorted(keys, key=lambda k: (k.created_at, k.key_id))

    # --- adapters ---

    async def put_adapter(self, record: AdapterRecord) -> None:
        tenant_k = self._k("tenant", record.tenant)
        shared_member = f"{record.tenant}/{record.name}"

        async def body(pipe: Pipeline) -> None:
            if not await pipe.exists(tenant_k):
                raise NotFound(f"tenant {record.tenant!r} does not exist")
            pipe.multi()
            pipe.hset(self._k("tenant", record.tenant, "adapters"), record.name,
                      json.dumps(record.to_dict()))
            if record.shared:
                pipe.sadd(self._k("shared"), shared_member)
            else:
                pipe.srem(self._k("shared"), shared_member)

        await self._transaction([tenant_k], body)

    async def get_adapter(self, tenant: str, name: str) -> AdapterRecord | None:
        async with self._guard():
            raw = await self._redis.hget(self._k("tenant", tenant, "adapters"), name)
        return AdapterRecord.from_dict(json.loads(raw)) if raw else None

    async def list_adapters(self, tenant: str | None = None) -> list[AdapterRecord]:
        async with self._guard():
            tenants = [tenant] if tenant is not None else \
                _strs(await self._redis.smembers(self._k("tenants")))
            records: list[AdapterRecord] = []
            for t in tenants:
                raws: dict[Any, Any] = await self._redis.hgetall(self._k("tenant", t, "adapters"))
                records.extend(AdapterRecord.from_dict(json.loads(raws[n])) for n in sorted(raws))
        return records

    async def list_shared_adapters(self) -> list[AdapterRecord]:
        async with self._guard():
            members = _strs(await self._redis.smembers(self._k("shared")))
            records = []
            for member in members:
                tenant, _, name = member.partition("/")
                raw = await self._redis.hget(self._k("tenant", tenant, "adapters"), name)
                if raw:
                    records.append(AdapterRecord.from_dict(json.loads(raw)))
        return records

    async def delete_adapter(self, tenant: str, name: str) -> None:
        adapters = self._k("tenant", tenant, "adapters")

        async def body(pipe: Pipeline) -> None:
            if not await pipe.hexists(adapters, name):
                raise NotFound(f"adapter {name!r} of tenant {tenant!r} does not exist")
            pipe.multi()
            pipe.hdel(adapters, name)
            pipe.srem(self._k("shared"), f"{tenant}/{name}")

        await self._transaction([adapters], body)

    # --- placement ---

    async def set_replica_adapters(self, replica_id: str, adapter_ids: list[str]) -> None:
        async def body(pipe: Pipeline) -> None:
            pipe.multi()
            pipe.hset(self._k("replicas"), replica_id, json.dumps(list(adapter_ids)))

        await self._transaction([], body)

    async def get_replica_adapters(self) -> dict[str, list[str]]:
        async with self._guard():
            raws: dict[Any, Any] = await self._redis.hgetall(self._k("replicas"))
        return {rid: json.loads(raws[rid]) for rid in _strs(raws)}

    async def remove_replica(self, replica_id: str) -> None:
        async def body(pipe: Pipeline) -> None:
            pipe.multi()
            pipe.hdel(self._k("replicas"), replica_id)

        await self._transaction([], body)

    # --- housekeeping ---

    async def generation(self) -> int:
        async with self._guard():
            return int(await self._redis.get(self._k("gen")) or 0)

    async def identity(self) -> RegistryIdentity:
        # Id and generation from one MGET (atomic); the lineage changes only on accept.
        async with self._guard():
            registry_id, gen = await self._redis.mget(self._k("id"), self._k("gen"))
            supersedes = await self._redis.smembers(self._k("supersedes"))
        return RegistryIdentity(str(registry_id) if registry_id else None, int(gen or 0),
                                frozenset(_strs(supersedes)))

    async def accept_restore(self, supersede: frozenset[str] = frozenset()) -> RegistryIdentity:
        id_k, sup_k = self._k("id"), self._k("supersedes")

        async def body(pipe: Pipeline) -> None:
            current = await pipe.get(id_k)
            old = {*supersede, NO_ID, *([current] if current else [])}
            pipe.multi()
            pipe.sadd(sup_k, *sorted(old))
            pipe.set(id_k, "reg-" + secrets.token_hex(16))

        await self._transaction([id_k, sup_k], body)
        return await self.identity()

    async def close(self) -> None:
        await self._redis.aclose()
