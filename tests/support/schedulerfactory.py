"""The real ``TokenFlowScheduler`` (vLLM's ``Scheduler`` subclass) with no model and no worker.

The model is vLLM's ``tests/v1/core/utils.py`` ``create_scheduler``: vLLM's configs are built
from a model directory's ``config.json`` only (no weights, no tokenizer), the KV cache is a
stated number of blocks of one full-attention layer, and ``step`` stands in for the model
runner by sampling one token for every scheduled request. So the translation between our
policy and vLLM's queues (pauses as recompute preemptions, parked requests, start order,
``max_loras``) runs in milliseconds after vLLM's import (~8 s).

``clock`` replaces the scheduler's wall clock (``TokenFlowScheduler._clock``), so a test
decides how fast time passes between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

KV_HEADS, HEAD_SIZE = 1, 16


def create_scheduler(
    model_dir: Path | str, *, policy: str = "tokenflow", max_num_seqs: int = 4,
    max_running: int | None = None, num_blocks: int = 256, block_size: int = 32,
    max_model_len: int = 512, max_loras: int | None = None,
    params: dict[str, float] | None = None, default_consumption_rate: float = 6.0,
    clock: Callable[[], float] | None = None,
) -> Any:
    """A ``TokenFlowScheduler`` over ``num_blocks`` KV blocks; LoRA on when ``max_loras``."""
    import torch
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        LoRAConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from lorafleet.serving.scheduling.vllm_scheduler import (
        CONFIG_KEY,
        SCHEDULER_CLS,
        TokenFlowScheduler,
    )

    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float32",
                        max_model_len=max_model_len, seed=0)
    scheduler = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_model_len,
        max_model_len=max_model_len, is_encoder_decoder=False, scheduler_cls=SCHEDULER_CLS)
    # No prefix caching: requests here carry no block hasher (nothing to share anyway).
    cache = CacheConfig(block_size=block_size, cache_dtype="auto", enable_prefix_caching=False)
    cache.num_gpu_blocks = num_blocks
    config = VllmConfig(
        model_config=model, scheduler_config=scheduler, cache_config=cache,
        device_config=DeviceConfig("cpu"),
        lora_config=LoRAConfig(max_loras=max_loras) if max_loras else None,
        additional_config={CONFIG_KEY: {
            "policy": policy, "params": dict(params or {}), "max_running": max_running,
            "default_consumption_rate": default_consumption_rate}},
    )
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer.0"], FullAttentionSpec(
            block_size=block_size, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
            dtype=torch.float32))])
    s = TokenFlowScheduler(vllm_config=config, kv_cache_config=kv,
                           structured_output_manager=StructuredOutputManager(config),
                           block_size=block_size)
    if clock is not None:
        s._clock = clock
    return s


def make_request(
    request_id: str, *, prompt_len: int = 20, max_tokens: int = 64, arrival: float = 0.0,
    consumption_rate: float | None = None, streaming: bool = True, lora_id: int | None = None,
    tenant: str | None = None,
) -> Any:
    """A vLLM ``Request`` carrying our per-request fields as the engine sets them."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.request import Request

    from lorafleet.serving.scheduling.vllm_scheduler import EXTRA_ARGS_KEY

    extra: dict[str, Any] = {"streaming": streaming}
    if consumption_rate is not None:
        extra["consumption_rate"] = consumption_rate
    if tenant is not None:
        extra["tenant"] = tenant
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                            extra_args={EXTRA_ARGS_KEY: extra})
    lora = LoRARequest(f"adapter-{lora_id}", lora_id, "/unused") if lora_id else None
    return Request(request_id=request_id, prompt_token_ids=[1 + i % 50 for i in range(prompt_len)],
                   sampling_params=params, pooling_params=None, arrival_time=arrival,
                   lora_request=lora)


def step(scheduler: Any, token: int = 7) -> Any:
    """One engine step: schedule, then one sampled token for each scheduled request whose
    prompt is done (as the model runner reports it). Returns vLLM's ``SchedulerOutput``."""
    from vllm.v1.outputs import ModelRunnerOutput

    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    reqs = scheduler.requests
    # schedule() has already counted this step's tokens as computed.
    sampled = [[token] if reqs[r].num_computed_tokens >= reqs[r].num_prompt_tokens else []
               for r in ids]
    scheduler.update_from_output(out, ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled))
    return out


def running_ids(scheduler: Any) -> list[str]:
    return sorted(r.request_id for r in scheduler.running)
