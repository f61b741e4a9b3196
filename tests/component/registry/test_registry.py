"""One behaviour suite, run against every registry backend."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from lorafleet.adapters.errors import AlreadyExists, NotFound
from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import AdapterRecord, ApiKey, Quota, Tenant
from lorafleet.adapters.registry import (
    RedisRegistry,
    Registry,
    SQLiteRegistry,
    open_registry,
)


def tenant(name: str = "alice") -> Tenant:
    return Tenant(name, name.title(), Quota(4, 60, 10_000), created_at=1.0)


def adapter(tenant: str = "alice", name: str = "sql", *, shared: bool = False,
            digest: str = "ab" * 32) -> AdapterRecord:
    return AdapterRecord(
        tenant=tenant, name=name, source=f"file:///adapters/{name}", base_model="tiny-llama",
        digest=digest, rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"),
        size_bytes=4096, shared=shared, created_at=2.0, secret_ref="creds" if shared else None,
        stored_at=f"s3://store/adapters/{digest}")


def key(tenant: str = "alice", created_at: float = 3.0) -> tuple[str, ApiKey]:
    plaintext, key_id = generate_key()
    return plaintext, ApiKey(key_id, tenant, hash_key(plaintext), created_at)


async def test_tenants_create_update_list_delete(registry: Registry) -> None:
    assert await registry.get_tenant("alice") is None
    await registry.put_tenant(tenant("bob"))
    await registry.put_tenant(tenant("alice"))
    assert await registry.get_tenant("alice") == tenant("alice")
    updated = replace(tenant("alice"), display_name="Alice A.", quota=Quota(max_concurrent=1))
    await registry.put_tenant(updated)
    assert await registry.get_tenant("alice") == updated
    assert [t.name for t in await registry.list_tenants()] == ["alice", "bob"]
    await registry.delete_tenant("bob")
    assert [t.name for t in await registry.list_tenants()] == ["alice"]
    with pytest.raises(NotFound):
        await registry.delete_tenant("bob")


async def test_keys_find_revoke_list(registry: Registry) -> None:
    await registry.put_tenant(tenant())
    plain1, k1 = key(created_at=1.0)
    plain2, k2 = key(created_at=2.0)
    await registry.add_key(k1)
    await registry.add_key(k2)
    assert await registry.find_key(hash_key(plain1)) == k1
    assert await registry.find_key(hash_key("lf_00000000_" + "x" * 32)) is None
    await registry.revoke_key("alice", k1.key_id)
    assert await registry.find_key(hash_key(plain1)) is None  # revoked keys do not authenticate
    assert await registry.find_key(hash_key(plain2)) == k2
    assert await registry.list_keys("alice") == [replace(k1, revoked=True), k2]
    with pytest.raises(NotFound):
        await registry.revoke_key("alice", "deadbeef")
    with pytest.raises(NotFound):
        await registry.revoke_key("bob", k2.key_id)  # another tenant's key


async def test_key_errors(registry: Registry) -> None:
    _, k = key()
    with pytest.raises(NotFound):
        await registry.add_key(k)  # no such tenant
    await registry.put_tenant(tenant())
    await registry.add_key(k)
    with pytest.raises(AlreadyExists):
        await registry.add_key(k)


async def test_adapters_crud_and_sharing(registry: Registry) -> None:
    with pytest.raises(NotFound):
        await registry.put_adapter(adapter())
    await registry.put_tenant(tenant("alice"))
    await registry.put_tenant(tenant("bob"))
    await registry.put_adapter(adapter("alice", "sql"))
    await registry.put_adapter(adapter("alice", "chat", shared=True))
    await registry.put_adapter(adapter("bob", "poems"))
    assert await registry.get_adapter("alice", "sql") == adapter("alice", "sql")
    assert await registry.get_adapter("bob", "sql") is None
    assert [a.name for a in await registry.list_adapters("alice")] == ["chat", "sql"]
    assert [a.adapter_id.split("@")[0] for a in await registry.list_adapters()] == [
        "alice/chat", "alice/sql", "bob/poems"]
    assert [a.name for a in await registry.list_shared_adapters()] == ["chat"]
    # Replace: a new digest and no longer shared.
    newer = adapter("alice", "chat", digest="cd" * 32)
    await registry.put_adapter(newer)
    assert await registry.get_adapter("alice", "chat") == newer
    assert await registry.list_shared_adapters() == []
    await registry.delete_adapter("alice", "sql")
    assert await registry.get_adapter("alice", "sql") is None
    with pytest.raises(NotFound):
        await registry.delete_adapter("alice", "sql")


async def test_delete_tenant_cascades(registry: Registry) -> None:
    await registry.put_tenant(tenant("alice"))
    await registry.put_tenant(tenant("bob"))
    plain, k = key("alice")
    await registry.add_key(k)
    await registry.put_adapter(adapter("alice", "chat", shared=True))
    await registry.put_adapter(adapter("bob", "poems", shared=True))
    await registry.delete_tenant("alice")
    assert await registry.find_key(hash_key(plain)) is None
    assert await registry.list_keys("alice") == []
    assert await registry.list_adapters("alice") == []
    assert [a.tenant for a in await registry.list_shared_adapters()] == ["bob"]
    # A tenant re-created with the same name starts empty.
    await registry.put_tenant(tenant("alice"))
    assert await registry.list_adapters("alice") == []
    await registry.add_key(k)  # the old key id is free again


async def test_replica_placement(registry: Registry) -> None:
    assert await registry.get_replica_adapters() == {}
    await registry.set_replica_adapters("r1", ["alice/sql@abababababab"])
    await registry.set_replica_adapters("r0", [])
    await registry.set_replica_adapters("r1", ["alice/sql@abababababab", "bob/x@cdcdcdcdcdcd"])
    assert await registry.get_replica_adapters() == {
        "r0": [], "r1": ["alice/sql@abababababab", "bob/x@cdcdcdcdcdcd"]}
    await registry.remove_replica("r0")
    await registry.remove_replica("r0")  # idempotent
    assert list(await registry.get_replica_adapters()) == ["r1"]


async def test_generation_grows_on_every_write(registry: Registry) -> None:
    seen = [await registry.generation()]

    async def wrote() -> None:
        now = await registry.generation()
        assert now > seen[-1]
        seen.append(now)

    await registry.put_tenant(tenant())
    await wrote()
    _, k = key()
    await registry.add_key(k)
    await wrote()
    await registry.put_adapter(adapter())
    await wrote()
    await registry.set_replica_adapters("r1", [])
    await wrote()
    await registry.get_tenant("alice")
    assert await registry.generation() == seen[-1]  # reads do not bump
    with pytest.raises(NotFound):
        await registry.delete_adapter("alice", "nope")
    assert await registry.generation() == seen[-1]  # failed writes do not bump


async def test_concurrent_writers_lose_nothing(registry: Registry) -> None:
    await registry.put_tenant(tenant())
    await asyncio.gather(*(registry.put_adapter(adapter(name=f"a{i}")) for i in range(20)))
    assert len(await registry.list_adapters("alice")) == 20


async def test_sqlite_is_shared_between_instances(tmp_path: Path) -> None:
    # Two registries over one file stand in for the operator and an ingress process.
    a, b = SQLiteRegistry(tmp_path / "r.db"), SQLiteRegistry(tmp_path / "r.db")
    try:
        await a.put_tenant(tenant())
        assert await b.get_tenant("alice") == tenant()
        assert await b.generation() == await a.generation() >= 1
    finally:
        await a.close()
        await b.close()


def test_open_registry_urls(tmp_path: Path) -> None:
    assert isinstance(open_registry(f"sqlite://{tmp_path}/a.db"), SQLiteRegistry)
    assert open_registry(f"sqlite://{tmp_path}/a.db").path == tmp_path / "a.db"  # type: ignore[attr-defined]
    assert open_registry("sqlite:rel/a.db").path == Path("rel/a.db")  # type: ignore[attr-defined]
    assert isinstance(open_registry("redis://127.0.0.1:1/0"), RedisRegistry)
    for bad in ("postgres://x", "sqlite://relative.db", "mysql:x"):
        with pytest.raises(ValueError):
            open_registry(bad)
