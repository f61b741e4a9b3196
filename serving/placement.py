"""Where the engine replicas run and which devices they ask for.

Boundary: policy here is pure (``decide_*``, ``check_*``) over plain values; the only I/O is
``cuda_available`` and ``observe_devices``, which read the process's devices at the edges
(the builder of the Serve app, and a replica as it starts). ``deploy`` turns the decisions
into Ray Serve deployment options; nothing here imports Ray at module level.

Why requests and not assumptions: Ray hides every GPU from an actor that asks for none
(it sets ``CUDA_VISIBLE_DEVICES=""``), so a replica without ``num_gpus`` finds no CUDA device
on a GPU node, and an autoscaler (KubeRay) adds GPU nodes only for demands it can see.

    tensor_parallel_size == 1   the replica actor holds its GPUs itself (``num_gpus``);
                                vLLM runs its one worker in the replica's own processes.
    tensor_parallel_size  > 1   the replica gets a placement group of one bundle per rank
                                (``STRICT_PACK``: ranks talk over NVLink, never the network);
                                the replica actor sits in bundle 0 holding no GPU, and vLLM's
                                Ray executor starts one worker per bundle, each on its own GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import EngineConfig, GpuRequest, PlacementStrategy
from .engine.errors import DeviceMismatch


@dataclass(frozen=True)
class ReplicaResources:
    """What one engine replica asks Ray for: the actor's own share and, for TP > 1, its bundles."""

    gpus_per_rank: float
    tensor_parallel_size: int
    actor_gpus: float
    bundles: tuple[Mapping[str, float], ...] = ()
    strategy: PlacementStrategy | None = None

    @property
    def gpus(self) -> float:
        """GPUs the whole replica occupies (all ranks)."""
        return self.gpus_per_rank * self.tensor_parallel_size

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment`` that carry this request.

        ``num_cpus`` stays 0: the replica's threads are vLLM's business (and the CPU build pins
        its own), and a CPU request would let a small head node refuse the replica for no reason.
        """
        options: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0, "num_gpus": self.actor_gpus}}
        if self.bundles:
            options["placement_group_bundles"] = [dict(b) for b in self.bundles]
            options["placement_group_strategy"] = self.strategy
        return options


def decide_gpus_per_rank(requested: GpuRequest, *, cuda: bool) -> float:
    """``auto`` is one GPU per rank when the platform is CUDA and none on the CPU.

    Decided once, where the app is built (``lorafleet serve``'s driver or ``build_app``), so
    every replica of one deployment asks for the same thing. A cluster whose builder has no GPU
    (a RayService head) must give a number; the chart always does.
    """
    if requested == "auto":
        return 1.0 if cuda else 0.0
    if requested < 0:
        raise ValueError(f"GPUs per replica must be >= 0, got {requested}")
    return float(requested)


def decide_replica_resources(
    requested: GpuRequest,
    tensor_parallel_size: int = 1,
    *,
    cuda: bool,
    strategy: PlacementStrategy = "STRICT_PACK",
) -> ReplicaResources:
    """The devices one engine replica asks for (see the module docstring for the two shapes).

    With TP > 1 every rank needs a whole device of its own, so a fractional GPU is refused:
    two ranks on one GPU would contend for memory that vLLM sized for one. On the CPU (no GPU)
    each rank's bundle holds one CPU instead, because Ray refuses an empty bundle.
    """
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    per_rank = decide_gpus_per_rank(requested, cuda=cuda)
    if tensor_parallel_size == 1:
        return ReplicaResources(per_rank, 1, actor_gpus=per_rank)
    if per_rank and per_rank != int(per_rank):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs whole GPUs per rank, got {per_rank}")
    bundle: dict[str, float] = {"GPU": per_rank} if per_rank else {"CPU": 1.0}
    return ReplicaResources(
        per_rank, tensor_parallel_size, actor_gpus=0.0,
        bundles=tuple(dict(bundle) for _ in range(tensor_parallel_size)), strategy=strategy,
    )


def replica_resources(config: EngineConfig, *, cuda: bool | None = None) -> ReplicaResources:
    """The one place ``auto`` is resolved: the request of every replica built from ``config``.

    ``cuda`` is looked up in this process when not given (tests and callers that know pass it).
    """
    if cuda is None:
        cuda = config.num_gpus == "auto" and cuda_available()
    return decide_replica_resources(
        config.num_gpus, config.tensor_parallel_size, cuda=cuda, strategy=config.placement_strategy)


def parallel_engine_args(config: EngineConfig) -> dict[str, Any]:
    """vLLM engine arguments for the replica's ranks.

    With TP > 1 vLLM must run its ranks as Ray actors inside the replica's placement group
    (the ``ray`` executor); its default multiprocessing executor would start every rank in
    the replica's own process tree, which holds no GPU in that shape.
    """
    if config.tensor_parallel_size == 1:
        return {}
    return {"tensor_parallel_size": config.tensor_parallel_size,
            "distributed_executor_backend": "ray"}


def cuda_available() -> bool:
    """Whether this process sees a CUDA device (the input of ``auto``)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# -- at replica start ------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFacts:
    """What a replica process sees of its devices as it starts."""

    platform: str  # vLLM's device type: "cuda", "rocm", "cpu", ...
    visible_devices: int  # devices the platform's runtime can open in this process
    ray_gpu_ids: Sequence[str] = ()  # what Ray assigned this actor (ray.get_gpu_ids())
    cuda_visible_devices: str | None = None  # the variable as Ray left it
    in_placement_group: bool = False
    placement_bundles: Sequence[Mapping[str, float]] = field(default_factory=tuple)


_GPU_PLATFORMS = frozenset({"cuda", "rocm"})


def check_replica_devices(resources: ReplicaResources, facts: DeviceFacts) -> None:
    """Refuse to start a replica whose request and devices disagree, with the reason.

    A wrong device picture otherwise shows up late and vaguely: vLLM's CUDA build with no
    visible device fails deep in its worker (or waits for one), and TP > 1 outside its placement
    group makes vLLM's Ray executor ask for GPUs the replica already holds, which never comes.
    On the CPU platform Ray's GPU ids are ignored by vLLM (fake GPU resources in a test
    cluster, or a CPU image on a GPU node), so only the placement-group rule applies there.
    """
    where = (f"Ray GPU ids {list(facts.ray_gpu_ids)}, "
             f"CUDA_VISIBLE_DEVICES={facts.cuda_visible_devices!r}")
    if resources.tensor_parallel_size > 1:
        if not facts.in_placement_group:
            raise DeviceMismatch(
                f"tensor_parallel_size={resources.tensor_parallel_size} but this replica runs "
                "outside a placement group; deploy it with the options from "
                "engine_deployment (placement_group_bundles)")
        have = len(facts.placement_bundles)
        if have < resources.tensor_parallel_size:
            raise DeviceMismatch(
                f"tensor_parallel_size={resources.tensor_parallel_size} but the replica's "
                f"placement group has {have} bundle(s)")
        return  # each rank's worker checks its own device when vLLM starts it
    if facts.platform not in _GPU_PLATFORMS:
        return
    if resources.actor_gpus == 0:
        raise DeviceMismatch(
            f"vLLM's platform is {facts.platform} but this replica asked Ray for no GPU, so Ray "
            f"hid every device from it ({where}); set num_gpus (--num-gpus, the chart's "
            "serving.engine.gpusPerReplica) to 1 or more")
    if facts.ray_gpu_ids and facts.visible_devices == 0:
        raise DeviceMismatch(
            f"Ray assigned GPU(s) to this replica but the {facts.platform} runtime sees none "
            f"({where}); the node's driver or device plugin does not expose the GPUs Ray "
            "advertises")
    if facts.visible_devices < math.ceil(resources.actor_gpus):
        raise DeviceMismatch(
            f"this replica asked for {resources.actor_gpus:g} GPU(s) but the {facts.platform} "
            f"runtime sees {facts.visible_devices} ({where})")


def observe_devices(platform: str | None = None) -> DeviceFacts:
    """Read the replica process's devices: Ray's assignment and what vLLM's platform opens.

    ``platform`` (vLLM's device type) is looked up from vLLM when not given; a caller that knows
    it (a test's stand-in replica, which must not import vLLM) passes it.
    """
    import os

    import ray

    if platform is None:
        from vllm.platforms import current_platform

        platform = str(current_platform.device_type)
    visible = 0
    if platform in _GPU_PLATFORMS:
        import torch

        visible = torch.cuda.device_count()
    pg = ray.util.get_current_placement_group()
    return DeviceFacts(
        platform=platform,
        visible_devices=visible,
        ray_gpu_ids=tuple(str(i) for i in ray.get_gpu_ids()),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        in_placement_group=pg is not None,
        placement_bundles=tuple(pg.bundle_specs) if pg is not None else (),
    )


def check_cluster_capacity(
    resources: ReplicaResources, replicas: int, cluster_gpus: float, *, can_grow: bool
) -> None:
    """Refuse a deployment that a fixed Ray cluster can never place.

    Ray Serve keeps an unplaceable replica pending forever (a log line, no error), so
    ``lorafleet serve`` on a machine without the GPUs would wait for ``/health`` and time out.
    A cluster that can grow (an autoscaler, or one we merely attach to) is given the benefit of
    the doubt.
    """
    need = resources.gpus * replicas
    if can_grow or need <= cluster_gpus:
        return
    raise DeviceMismatch(
        f"{replicas} engine replica(s) x {resources.gpus:g} GPU(s) need {need:g} GPU(s) but this "
        f"Ray cluster has {cluster_gpus:g}; use --num-gpus 0 on a CPU machine, fewer "
        "--replicas, or attach to a cluster with GPUs (--ray-address)")
