"""Tenant resources: quotas and API keys from Secrets reach the registry; deleting a Secret revokes."""

from __future__ import annotations

from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.registry import Registry

from .conftest import SECRETS, TENANTS, Cluster, secret


def tenant_cr(*secrets: str) -> dict:
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": "bob"},
            "spec": {"displayName": "Bob", "quota": {"requestsPerMinute": 30, "maxConcurrent": 2},
                     "apiKeySecrets": [{"name": s} for s in secrets]}}


async def key_active(registry: Registry, plaintext: str) -> bool:
    return await registry.find_key(hash_key(plaintext)) is not None


async def test_key_secret_registers_and_deleting_it_revokes(cluster: Cluster,
                                                            registry: Registry) -> None:
    key, key_id = generate_key()
    other, _ = generate_key()
    await cluster.apply(SECRETS, secret("bob-key", key))
    await cluster.apply(SECRETS, secret("bob-key-2", other))
    await cluster.apply(TENANTS, tenant_cr("bob-key", "bob-key-2"))

    await cluster.wait_for(lambda: key_active(registry, key), what="key registered")
    tenant = await registry.get_tenant("bob")
    assert tenant is not None and tenant.quota.requests_per_minute == 30
    await cluster.wait_for(
        lambda: (cluster.get(TENANTS, "bob") or {}).get("status", {}).get("keyCount") == 2,
        what="keyCount")
    # The key never shows up in the Tenant resource, only counts and Secret names.
    assert key not in str(cluster.get(TENANTS, "bob")) and key_id in str(
        [k.key_id for k in await registry.list_keys("bob")])

    await cluster.delete(SECRETS, "bob-key")
    await cluster.wait_for(lambda: _not(key_active(registry, key)), timeout=5,
                           what="key revoked")
    assert await key_active(registry, other)
    await cluster.wait_for(
        lambda: (cluster.get(TENANTS, "bob") or {}).get("status", {}).get("phase") == "Degraded",
        what="Degraded status")
    assert "bob-key" in cluster.get(TENANTS, "bob")["status"]["message"]


async def test_deleting_the_tenant_revokes_its_keys(cluster: Cluster, registry: Registry) -> None:
    key, _ = generate_key()
    await cluster.apply(SECRETS, secret("bob-key", key))
    await cluster.apply(TENANTS, tenant_cr("bob-key"))
    await cluster.wait_for(lambda: key_active(registry, key), what="key registered")
    await cluster.delete(TENANTS, "bob")
    await cluster.wait_for(lambda: cluster.get(TENANTS, "bob") is None, what="tenant gone")
    assert not await key_active(registry, key)
    assert await registry.get_tenant("bob") is None


async def _not(awaitable) -> bool:  # type: ignore[no-untyped-def]
    return not await awaitable
