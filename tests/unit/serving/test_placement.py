"""What an engine replica asks Ray for, and when it refuses to start.

Boundary: pure policy (``serving.placement``) and the deployment options built from it; no Ray
cluster (tests/component/cluster proves the placement on real raylets).
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet.serving.config import EngineConfig
from lorafleet.serving.deploy import AppArgs, engine_deployment, engine_options
from lorafleet.serving.engine.errors import DeviceMismatch, EngineError
from lorafleet.serving.placement import (
    DeviceFacts,
    check_cluster_capacity,
    check_replica_devices,
    decide_gpus_per_rank,
    decide_replica_resources,
    parallel_engine_args,
    replica_resources,
)


def config(**kw: object) -> EngineConfig:
    return EngineConfig(model_dir="/models/m", served_model_name="m", **kw)  # type: ignore[arg-type]


# -- the decision ----------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "cuda", "expected"), [
    ("auto", True, 1.0), ("auto", False, 0.0),
    (2, False, 2.0),  # an explicit number is taken as given, whatever this machine has
    (0, True, 0.0), (0.5, True, 0.5),
])
def test_gpus_per_rank(requested: float | str, cuda: bool, expected: float) -> None:
    assert decide_gpus_per_rank(requested, cuda=cuda) == expected  # type: ignore[arg-type]


def test_negative_gpus_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        decide_gpus_per_rank(-1, cuda=True)
    with pytest.raises(ValidationError, match="num_gpus"):
        config(num_gpus=-1)


def test_tp1_replica_holds_its_gpu_itself() -> None:
    r = decide_replica_resources("auto", 1, cuda=True)
    assert r.deployment_options() == {"ray_actor_options": {"num_cpus": 0, "num_gpus": 1.0}}
    assert r.gpus == 1.0 and not r.bundles


def test_tp_above_1_gets_one_packed_bundle_per_rank_and_the_actor_holds_none() -> None:
    r = decide_replica_resources(1, 4, cuda=True)
    opts = r.deployment_options()
    assert opts["placement_group_bundles"] == [{"GPU": 1.0}] * 4
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    # A GPU on the actor would take bundle 0's device from vLLM's rank-0 worker.
    assert opts["ray_actor_options"]["num_gpus"] == 0
    assert r.gpus == 4.0


def test_tp_on_the_cpu_uses_cpu_bundles_since_ray_refuses_empty_ones() -> None:
    opts = decide_replica_resources("auto", 2, cuda=False).deployment_options()
    assert opts["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_tp_needs_whole_gpus_per_rank() -> None:
    with pytest.raises(ValueError, match="whole GPUs"):
        decide_replica_resources(0.5, 2, cuda=True)
    with pytest.raises(ValidationError, match="whole GPUs"):
        config(num_gpus=0.5, tensor_parallel_size=2)


def test_auto_is_resolved_in_one_place_and_explicit_numbers_skip_detection(monkeypatch) -> None:
    import lorafleet.serving.placement as placement

    calls: list[int] = []
    monkeypatch.setattr(placement, "cuda_available", lambda: calls.append(1) or True)
    assert replica_resources(config(num_gpus=0)).gpus == 0.0 and not calls
    assert replica_resources(config()).gpus == 1.0 and calls == [1]
    assert replica_resources(config(), cuda=False).gpus == 0.0


def test_vllm_runs_tp_ranks_with_the_ray_executor() -> None:
    assert parallel_engine_args(config()) == {}
    assert parallel_engine_args(config(num_gpus=1, tensor_parallel_size=2)) == {
        "tensor_parallel_size": 2, "distributed_executor_backend": "ray"}


# -- the deployment options the engine uses --------------------------------------------


def test_engine_deployment_asks_ray_for_its_gpus() -> None:
    # Today's main asked for {"num_cpus": 0} only: Ray then hides every GPU from vLLM.
    d = engine_deployment(config(num_gpus=1), num_replicas=3)
    assert d.ray_actor_options == {"num_cpus": 0, "num_gpus": 1.0}
    assert d.num_replicas == 3


def test_engine_deployment_with_tp_carries_its_placement_group() -> None:
    opts = engine_options(config(num_gpus=1, tensor_parallel_size=2), num_replicas=2)
    assert opts["placement_group_bundles"] == [{"GPU": 1.0}, {"GPU": 1.0}]
    d = engine_deployment(config(num_gpus=1, tensor_parallel_size=2), num_replicas=2)
    assert d._replica_config.placement_group_bundles == [{"GPU": 1.0}, {"GPU": 1.0}]
    assert d._replica_config.placement_group_strategy == "STRICT_PACK"


def test_autoscaled_engine_options_leave_the_count_to_serve() -> None:
    opts = engine_options(config(num_gpus=1), 1, {"min_replicas": 1, "max_replicas": 4})
    assert opts["num_replicas"] is None and opts["autoscaling_config"]["max_replicas"] == 4
    assert opts["ray_actor_options"]["num_gpus"] == 1.0


def test_app_args_reach_the_engine_config() -> None:
    a = AppArgs(model_dir="/m", served_model_name="m", num_gpus=1, tensor_parallel_size=2,
                ingress_num_replicas=3)
    c = a.engine_config()
    assert (c.num_gpus, c.tensor_parallel_size, c.placement_strategy) == (1, 2, "STRICT_PACK")
    assert AppArgs(model_dir="/m", served_model_name="m").engine_config().num_gpus == "auto"
    with pytest.raises(ValidationError):
        AppArgs(model_dir="/m", served_model_name="m", ingress_num_replicas=0)


def test_cli_flags_reach_the_engine_config() -> None:
    from lorafleet.serving.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--num-gpus", "0.5", "--tensor-parallel-size", "1", "--ingress-replicas", "2"])
    assert (args.num_gpus, args.tensor_parallel_size, args.ingress_replicas) == (0.5, 1, 2)
    assert build_parser().parse_args(["serve"]).num_gpus == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--num-gpus", "many"])


# -- at replica start ------------------------------------------------------------------

GPU1 = decide_replica_resources(1, 1, cuda=True)
NO_GPU = decide_replica_resources(0, 1, cuda=True)
TP2 = decide_replica_resources(1, 2, cuda=True)


def test_cuda_replica_that_sees_its_gpu_starts() -> None:
    check_replica_devices(GPU1, DeviceFacts("cuda", 1, ("3",), "3"))


def test_cuda_platform_with_no_visible_device_is_refused_with_the_reason() -> None:
    with pytest.raises(DeviceMismatch, match=r"sees none .*CUDA_VISIBLE_DEVICES='3'"):
        check_replica_devices(GPU1, DeviceFacts("cuda", 0, ("3",), "3"))


def test_cuda_replica_that_asked_for_no_gpu_is_told_to_ask() -> None:
    # The bug of today's main: Ray hid the GPUs because the replica asked for none.
    with pytest.raises(DeviceMismatch, match="asked Ray for no GPU.*num_gpus"):
        check_replica_devices(NO_GPU, DeviceFacts("cuda", 0, (), ""))


def test_cpu_platform_starts_whatever_ray_assigned() -> None:
    # Fake GPU resources in a test cluster, or the CPU image on a GPU node: vLLM ignores them.
    check_replica_devices(GPU1, DeviceFacts("cpu", 0, ("0",), "0"))
    check_replica_devices(NO_GPU, DeviceFacts("cpu", 0))


def test_fewer_devices_than_asked_is_refused() -> None:
    two = decide_replica_resources(2, 1, cuda=True)
    with pytest.raises(DeviceMismatch, match="asked for 2 GPU"):
        check_replica_devices(two, DeviceFacts("cuda", 1, ("0", "1"), "0"))


def test_tp_replica_must_run_inside_its_placement_group() -> None:
    with pytest.raises(DeviceMismatch, match="outside a placement group"):
        check_replica_devices(TP2, DeviceFacts("cuda", 0))
    with pytest.raises(DeviceMismatch, match="has 1 bundle"):
        check_replica_devices(TP2, DeviceFacts("cuda", 0, in_placement_group=True,
                                               placement_bundles=({"GPU": 1},)))
    check_replica_devices(TP2, DeviceFacts("cuda", 0, in_placement_group=True,
                                           placement_bundles=({"GPU": 1}, {"GPU": 1})))


def test_device_mismatch_is_an_engine_error() -> None:
    assert issubclass(DeviceMismatch, EngineError)


def test_a_fixed_cluster_without_the_gpus_is_refused_up_front() -> None:
    with pytest.raises(DeviceMismatch, match=r"need 4 GPU.*has 2"):
        check_cluster_capacity(TP2, 2, 2.0, can_grow=False)
    check_cluster_capacity(TP2, 2, 4.0, can_grow=False)
    check_cluster_capacity(TP2, 2, 0.0, can_grow=True)  # an autoscaler may add GPU nodes
    check_cluster_capacity(NO_GPU, 8, 0.0, can_grow=False)
