"""LoRAAdapter lifecycle through the real kopf operator and the Kubernetes API emulator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .conftest import ADAPTERS, BASE_MODEL, TENANTS, Cluster, FakeServing, write_adapter


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


async def test_apply_becomes_ready_only_once_loaded(cluster: Cluster, serving: FakeServing,
                                                    workdir: Path) -> None:
    src = write_adapter(workdir / "sql")
    await cluster.apply(TENANTS, TENANT)
    await cluster.apply(ADAPTERS, adapter_cr("sql", str(src)))
    await cluster.wait_for(lambda: phase(cluster, "sql") == "Ready", what="Ready")

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
    await cluster.apply(TENANTS, TENANT)
    await cluster.apply(ADAPTERS, adapter_cr("poet", str(src)))
    await cluster.wait_for(lambda: phase(cluster, "poet") == "Ready", what="Ready")
    assert cluster.get(ADAPTERS, "poet")["metadata"]["finalizers"]

    await cluster.delete(ADAPTERS, "poet")
    await cluster.wait_for(lambda: cluster.get(ADAPTERS, "poet") is None, what="object gone")
    assert ("alice", "poet") not in serving.adapters
    assert serving.loaded_ids() == set()


async def test_pickle_adapter_fails_with_message_and_is_not_retried(
        cluster: Cluster, serving: FakeServing, workdir: Path) -> None:
    src = write_adapter(workdir / "evil", pickle=True)
    await cluster.apply(TENANTS, TENANT)
    await cluster.apply(ADAPTERS, adapter_cr("evil", str(src)))
    await cluster.wait_for(lambda: phase(cluster, "evil") == "Failed", what="Failed")

    status = cluster.get(ADAPTERS, "evil")["status"]
    assert "pickle" in status["message"].lower() or ".bin" in status["message"]
    assert serving.loaded_ids() == set() and not serving.adapters
    posts = len([c for c in serving.calls if c[0] == "POST"])
    await asyncio.sleep(2.0)  # several resync intervals: no new registration attempts
    assert len([c for c in serving.calls if c[0] == "POST"]) == posts


async def test_wrong_base_model_fails_nothing_loaded(
        cluster: Cluster, serving: FakeServing, workdir: Path) -> None:
    src = write_adapter(workdir / "gpt", base_model="gpt2")
    await cluster.apply(TENANTS, TENANT)
    await cluster.apply(ADAPTERS, adapter_cr("gpt", str(src)))
    await cluster.wait_for(lambda: phase(cluster, "gpt") == "Failed", what="Failed")
    message = cluster.get(ADAPTERS, "gpt")["status"]["message"]
    assert "gpt2" in message and BASE_MODEL in message
    assert serving.loaded_ids() == set()


async def test_new_replica_gets_adapters_placed_on_all(
        cluster: Cluster, serving: FakeServing, workdir: Path) -> None:
    src = write_adapter(workdir / "sql")
    await cluster.apply(TENANTS, TENANT)
    await cluster.apply(ADAPTERS, adapter_cr("sql", str(src)))
    await cluster.wait_for(lambda: phase(cluster, "sql") == "Ready", what="Ready")
    new = serving.add_replica()  # scale-out: the new replica starts empty
    aid = serving.adapters[("alice", "sql")]["adapter_id"]
    await cluster.wait_for(lambda: aid in serving.replicas[new], timeout=10, what="resync")
    await cluster.wait_for(
        lambda: cluster.get(ADAPTERS, "sql")["status"]["readyReplicas"] == 3, what="status")

