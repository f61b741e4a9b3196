"""Tenants bound to namespaces, and keys the operator does not own (issue 19 item 17).

The real kopf operator against the API emulator, watching three namespaces: `ns1` (bound to
every tenant, as an operator watching only its own namespace is configured) and `team-a`,
`team-b`, each bound only to the tenant of its own name (the default rule). What a tenant
would notice: another namespace's objects can neither replace its adapters nor add, revoke or
delete its keys, and keys made through the admin API survive the operator's key sync.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import ApiKey, Tenant
from lorafleet.adapters.registry import Registry
from lorafleet.operator.emulation import NAMESPACES
from lorafleet.operator.tenant_store import RegistryTenantStore

from .conftest import (
    ADAPTERS,
    BASE_MODEL,
    SECRETS,
    TENANTS,
    Cluster,
    FakeServing,
    operator_on,
    secret,
    write_adapter,
)


@pytest_asyncio.fixture()
async def cluster(serving: FakeServing,
                  tenant_store: RegistryTenantStore) -> AsyncIterator[Cluster]:
    """The operator watching all three namespaces (the shared fixture watches one)."""
    async with operator_on(serving, tenant_store, namespaces=NAMESPACES) as running:
        yield running


def tenant_cr(name: str, *secrets: str) -> dict[str, Any]:
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
            "spec": {"displayName": name, "apiKeySecrets": [{"name": s} for s in secrets]}}


def adapter_cr(name: str, tenant: str, uri: str) -> dict[str, Any]:
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"tenant": tenant, "adapterName": "sql", "baseModel": BASE_MODEL,
                     "source": {"uri": uri}, "placement": {"mode": "all"}}}


def status(cluster: Cluster, resource: str, name: str, namespace: str) -> dict[str, Any]:
    return (cluster.get(resource, name, namespace) or {}).get("status") or {}


async def active(registry: Registry, plaintext: str) -> bool:
    return await registry.find_key(hash_key(plaintext)) is not None


async def test_an_adapter_in_another_namespace_cannot_replace_a_tenants_adapter(
        cluster: Cluster, serving: FakeServing, workdir: Path) -> None:
    await cluster.apply(TENANTS, tenant_cr("team-b"), namespace="team-b")
    await cluster.apply(ADAPTERS, adapter_cr("sql", "team-b", str(write_adapter(workdir / "b"))),
                        namespace="team-b")
    await cluster.wait_for(lambda: status(cluster, ADAPTERS, "sql", "team-b").get("phase")
                           == "Ready", what="team-b's adapter Ready")
    theirs = dict(serving.adapters[("team-b", "sql")])

    hostile = write_adapter(workdir / "evil", seed=7)
    await cluster.apply(ADAPTERS, adapter_cr("steal", "team-b", str(hostile)),
                        namespace="team-a")
    await cluster.wait_for(lambda: status(cluster, ADAPTERS, "steal", "team-a").get("phase")
                           == "Failed", what="the other namespace's adapter Failed")
    refused = status(cluster, ADAPTERS, "steal", "team-a")
    assert "team-a" in refused["message"] and "team-b" in refused["message"]
    assert refused["conditions"][0]["reason"] == "TenantNotBound"
    assert serving.adapters[("team-b", "sql")] == theirs  # same digest, same id

    posts = len([c for c in serving.calls if c[0] != "GET"])
    await cluster.delete(ADAPTERS, "steal", namespace="team-a")
    await cluster.wait_for(lambda: cluster.get(ADAPTERS, "steal", "team-a") is None,
                           what="the refused adapter deleted")
    assert ("team-b", "sql") in serving.adapters  # its deletion deleted nothing of team-b's
    assert len([c for c in serving.calls if c[0] != "GET"]) == posts


async def test_a_tenant_object_in_another_namespace_cannot_touch_its_keys(
        cluster: Cluster, registry: Registry) -> None:
    key, _ = generate_key()
    await cluster.apply(SECRETS, secret("key", key), namespace="team-b")
    await cluster.apply(TENANTS, tenant_cr("team-b", "key"), namespace="team-b")
    await cluster.wait_for(lambda: active(registry, key), what="team-b's own key")

    planted, _ = generate_key()
    await cluster.apply(SECRETS, secret("key", planted), namespace="team-a")
    await cluster.apply(TENANTS, tenant_cr("team-b", "key"), namespace="team-a")
    await cluster.wait_for(lambda: status(cluster, TENANTS, "team-b", "team-a").get("phase")
                           == "Failed", what="the impostor Tenant Failed")
    assert not await active(registry, planted)  # no key added to team-b
    assert await active(registry, key)  # and team-b's own not revoked

    await cluster.delete(TENANTS, "team-b", namespace="team-a")
    await cluster.wait_for(lambda: cluster.get(TENANTS, "team-b", "team-a") is None,
                           what="the impostor deleted")
    assert await registry.get_tenant("team-b") is not None and await active(registry, key)


async def test_the_key_sync_leaves_admin_api_keys_alone(cluster: Cluster,
                                                        registry: Registry) -> None:
    managed, _ = generate_key()
    await cluster.apply(SECRETS, secret("bob-key", managed))
    await cluster.apply(TENANTS, tenant_cr("bob", "bob-key"))
    await cluster.wait_for(lambda: active(registry, managed), what="the Secret's key")
    # What `POST /admin/v1/tenants/bob/keys` does: a key of the registry's, no owner.
    admin, admin_id = generate_key()
    await registry.add_key(ApiKey(admin_id, "bob", hash_key(admin), 0.0))

    await cluster.delete(SECRETS, "bob-key")  # a sync runs at once, and the timer each second
    await cluster.wait_for(lambda: _inactive(registry, managed), what="the Secret's key revoked")
    await cluster.wait_for(lambda: status(cluster, TENANTS, "bob", "ns1").get("phase")
                           == "Degraded", what="Degraded")
    assert await active(registry, admin)


async def test_a_key_put_in_a_secret_is_adopted_and_then_follows_the_secret(
        cluster: Cluster, registry: Registry) -> None:
    """A key registered without an owner (through the admin API, or by an operator version
    before owners) that a Secret now holds is the Secret's: removing it revokes the key."""
    await registry.put_tenant(Tenant("carol", "Carol"))
    key, key_id = generate_key()
    await registry.add_key(ApiKey(key_id, "carol", hash_key(key), 0.0))
    await cluster.apply(SECRETS, secret("carol-key", key))
    await cluster.apply(TENANTS, tenant_cr("carol", "carol-key"))
    await cluster.wait_for(lambda: status(cluster, TENANTS, "carol", "ns1").get("phase")
                           == "Ready", what="carol Ready")
    assert [k.owner for k in await registry.list_keys("carol")] == ["operator"]
    await cluster.delete(SECRETS, "carol-key")
    await cluster.wait_for(lambda: _inactive(registry, key), what="the adopted key revoked")


async def _inactive(registry: Registry, plaintext: str) -> bool:
    return not await active(registry, plaintext)
