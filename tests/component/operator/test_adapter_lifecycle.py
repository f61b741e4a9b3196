"""LoRAAdapter lifecycle through the real kopf operator and the Kubernetes API emulator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import kmock

from lorafleet.operator.emulation import declare_resources, run_operator
from lorafleet.operator.serving_client import ServingClient

from .conftest import (
    ADAPTERS,
    BASE_MODEL,
    TENANTS,
    Cluster,
    FakeServing,
    write_adapter,
)


def adapter_cr(name: str, uri: str, *, base_model: str = BASE_MODEL,
               placement: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"tenant": "alice", "baseModel": base_model, "source": {"uri": uri},
                     "placement": placement or {"mode": "all"}}}


TENANT = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": "alice"},
          "spec": {"displayName": "Alice", "quota": {"requestsPerMinute": 60}}}


def phase(cluster: Cluster, name: str) -> str | None:
    obj = cluster.get(ADAPTERS, name)
    return (obj or {}).get("status", {}).get("phase")


async def apply_adapter(cluster: Cluster, name: str, src: Path, *, until: str) -> None:
    """Alice's Tenant, once Ready the LoRAAdapter `name` from `src`; waits for its phase `until`.

    Applied together, the adapter's first reconcile may find the tenant not yet registered: a
    temporary error whose retry can come after the phase `until`, which a test counting calls
    to serving would read as work the operator should not have done."""
    await cluster.apply(TENANTS, TENANT)
    await cluster.wait_for(
        lambda: (cluster.get(TENANTS, "alice") or {}).get("status", {}).get("phase") == "Ready",
        what="tenant Ready")
    await cluster.apply(ADAPTERS, adapter_cr(name, str(src)))
    await cluster.wait_for(lambda: phase(cluster, name) == until, what=until)


async def test_apply_becomes_ready_only_once_loaded(cluster: Cluster, serving: FakeServing,
                                                    workdir: Path) -> None:
    src = write_adapter(workdir / "sql")
    await apply_adapter(cluster, "sql", src, until="Ready")

    status = cluster.get(ADAPTERS, "sql")["status"]
    record = serving.adapters[("alice", "sql")]
    assert status["replicas"] == ["replica-0", "replica-1"]
    assert status["readyReplicas"] == status["wantedReplicas"] == 2
    assert status["digest"] == record["digest"]
    assert status["adapterId"] == record["adapter_id"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True"}
    assert all(record["adapter_id"] in ids for ids in serving.replicas.values())


async def test_delete_unloads_unregisters_and_releases_finalizer(
        cluster: Cluster, serving: FakeServing, workdir: Path) -> None:
    src = write_adapter(workdir / "poet")
    await apply_adapter(cluster, "poet", src, until="Ready")
    assert cluster.get(ADAPTERS, "poet")["metadata"]["finalizers"]

    await cluster.delete(ADAPTERS, "poet")
    await cluster.wait_for(lambda: cluster.get(ADAPTERS, "poet") is None, what="object gone")
    assert ("alice", "poet") not in serving.adapters
    assert serving.loaded_ids() == set()


async def test_pickle_adapter_fails_with_message_and_is_not_retried(
        cluster: Cluster, serving: FakeServing, workdir: Path) -> None:
    src = write_adapter(workdir / "evil", pickle=True)
    await apply_adapter(cluster, "evil", src, until="Failed")

    status = cluster.get(ADAPTERS, "evil")["status"]
    assert "pickle" in status["message"].lower() or ".bin" in status["message"]
    assert serving.loaded_ids() == set() and not serving.adapters
    posts = len([c for c in serving.calls if c[0] == "POST"])
    await asyncio.sleep(2.0)  # several resync intervals: no new registration attempts
    assert len([c for c in serving.calls if c[0] == "POST"]) == posts


async def test_wrong_base_model_fails_nothing_loaded(
        cluster: Cluster, serving: FakeServing, workdir: Path) -> None:
    src = write_adapter(workdir / "gpt", base_model="gpt2")
    await apply_adapter(cluster, "gpt", src, until="Failed")
    message = cluster.get(ADAPTERS, "gpt")["status"]["message"]
    assert "gpt2" in message and BASE_MODEL in message
    assert serving.loaded_ids() == set()


async def test_new_replica_gets_adapters_placed_on_all(
        cluster: Cluster, serving: FakeServing, workdir: Path) -> None:
    src = write_adapter(workdir / "sql")
    await apply_adapter(cluster, "sql", src, until="Ready")
    new = serving.add_replica()  # scale-out: the new replica starts empty
    aid = serving.adapters[("alice", "sql")]["adapter_id"]
    await cluster.wait_for(lambda: aid in serving.replicas[new], timeout=10, what="resync")
    await cluster.wait_for(
        lambda: cluster.get(ADAPTERS, "sql")["status"]["readyReplicas"] == 3, what="status")



async def test_spec_change_rolls_to_the_new_version_without_a_gap(
        cluster: Cluster, serving: FakeServing, workdir: Path) -> None:
    v1 = write_adapter(workdir / "v1", seed=1)
    v2 = write_adapter(workdir / "v2", seed=2)
    await apply_adapter(cluster, "roll", v1, until="Ready")
    old_id = cluster.get(ADAPTERS, "roll")["status"]["adapterId"]

    spec = cluster.get(ADAPTERS, "roll")["spec"]
    await cluster.patch_spec(ADAPTERS, "roll", {**spec, "source": {"uri": str(v2)}}, generation=2)
    await cluster.wait_for(
        lambda: cluster.get(ADAPTERS, "roll")["status"].get("source") == str(v2)
        and phase(cluster, "roll") == "Ready", what="rolled")
    status = cluster.get(ADAPTERS, "roll")["status"]
    assert status["adapterId"] != old_id and status["observedGeneration"] == 2
    assert serving.loaded_ids() == {status["adapterId"]}


async def test_operator_restart_resumes_without_registering_again(
        serving: FakeServing, tenant_store: Any, workdir: Path) -> None:
    src = write_adapter(workdir / "keep")
    client = ServingClient("http://serving", "k", transport=httpx.MockTransport(serving.handle),
                           replicas_ttl=0.0)
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s):
        declare_resources(k8s)
        async with run_operator(client, tenant_store, k8s) as cluster:
            await cluster.apply(TENANTS, TENANT)
            await cluster.apply(ADAPTERS, adapter_cr("keep", str(src)))
            await cluster.wait_for(lambda: phase(cluster, "keep") == "Ready", what="Ready")
        registrations = serving.calls.count(("POST", "/admin/v1/tenants/alice/adapters"))
        serving.replicas["replica-1"].clear()  # meanwhile a serving replica restarted empty

        async with run_operator(client, tenant_store, k8s) as cluster:
            aid = serving.adapters[("alice", "keep")]["adapter_id"]
            await cluster.wait_for(lambda: aid in serving.replicas["replica-1"], what="resync")
            assert phase(cluster, "keep") == "Ready"
        assert serving.calls.count(("POST", "/admin/v1/tenants/alice/adapters")) == registrations
    await client.aclose()


async def test_operator_stopped_mid_reconcile_neither_repeats_nor_loses_work(
        serving: FakeServing, tenant_store: Any, workdir: Path) -> None:
    """20 adapters applied at once; the operator is stopped while registrations are still
    under way (one of them in flight inside serving), then started again."""
    names = [f"ad{i:02d}" for i in range(20)]
    sources = {n: write_adapter(workdir / n) for n in names}
    registered = serving.registrations  # what serving accepted (a refused POST is retried)
    handle = serving.handle
    one_at_a_time = asyncio.Lock()

    async def slow_handle(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/adapters"):
            async with one_at_a_time:  # serving registers one at a time, each takes a while
                await asyncio.sleep(0.15)
                return await handle(request)
        return await handle(request)

    client = ServingClient("http://serving", "k", transport=httpx.MockTransport(slow_handle),
                           replicas_ttl=0.0)
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s):
        declare_resources(k8s)
        async with run_operator(client, tenant_store, k8s, stop_grace_s=None) as cluster:
            await cluster.apply(TENANTS, TENANT)
            for n in names:
                await cluster.apply(ADAPTERS, adapter_cr(n, str(sources[n])))
            await cluster.wait_for(lambda: len(registered) >= 5, what="some registered")
        stopped_with = len(registered)
        ready_before = sum(phase(cluster, n) == "Ready" for n in names)
        assert stopped_with < len(names), "the operator finished before it was stopped"

        async with run_operator(client, tenant_store, k8s) as cluster:
            await cluster.wait_for(lambda: all(phase(cluster, n) == "Ready" for n in names),
                                   what="all Ready", timeout=120)
        ids = {serving.adapters[("alice", n)]["adapter_id"] for n in names}
        print(f"\noperator restart: stopped after {stopped_with} registrations "
              f"({ready_before} Ready); after restart {len(registered)} registrations, "
              f"{len(ids)} adapters loaded on every replica")
        assert sorted(registered) == names  # each exactly once: nothing repeated, nothing lost
        assert all(ids_on == ids for ids_on in serving.replicas.values())
    await client.aclose()
