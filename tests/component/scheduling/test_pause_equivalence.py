"""Pausing is invisible in the output: greedy text is identical with and without pauses.

A real vLLM engine on the tiny random Llama (fp32), first stock (fcfs), then with the TokenFlow
scheduler squeezed to one batch slot and a tiny pause threshold, so that every request is
paused and resumed several times; base-model and adapter requests share the batch.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from adapterfiles import local_ref, node_files

from lorafleet.serving.config import EngineConfig
from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME, make_random_adapter, make_tiny_model
from lorafleet.serving.engine.protocol import AdapterRef, GenerateRequest, SamplingOptions
from lorafleet.serving.engine.vllm_engine import VLLMEngine
from lorafleet.serving.scheduling.metrics import read_counters

pytestmark = pytest.mark.vllm

DATA_DIR = Path(os.environ.get("LORAFLEET_DATA_DIR", Path(__file__).resolve().parents[3] / ".lorafleet"))


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return make_tiny_model(DATA_DIR / "models" / TINY_MODEL_NAME)


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[AdapterRef]:
    root = tmp_path_factory.mktemp("sched-adapters")
    out = []
    for i, (rank, targets) in enumerate([(8, ["q_proj", "v_proj"]), (4, ["o_proj", "down_proj"])]):
        path = make_random_adapter(tiny_model, root / f"ad{i}", rank=rank, target_modules=targets,
                                   seed=40 + i, base_model_name=TINY_MODEL_NAME)
        out.append(local_ref(f"t/ad{i}@{i:012d}", path, tiny_model, TINY_MODEL_NAME))
    return out


def _config(tiny_model: Path, policy: str) -> EngineConfig:
    return EngineConfig(
        model_dir=str(tiny_model), served_model_name=TINY_MODEL_NAME, dtype="float32",
        max_model_len=512, max_loras=2, max_lora_rank=16, max_cpu_loras=4,
        kv_cache_bytes=16 * 2**20, multiprocessing=False,
        scheduling_policy=policy,  # type: ignore[arg-type]
        scheduling_max_running=1, scheduling_params={"pause_min_buffer_s": 0.05, "min_run_s": 0.0},
        default_consumption_rate=0.5,
    )


def _requests(adapters: list[AdapterRef]) -> list[GenerateRequest]:
    reqs = []
    for i, adapter in enumerate([None, adapters[0], None, adapters[1], adapters[0]]):
        prompt = tuple(range(10 + 7 * i, 10 + 7 * i + 40 + 13 * i))
        reqs.append(GenerateRequest(
            request_id=f"eq-{i}", prompt_token_ids=prompt,
            sampling=SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True),
            adapter=adapter, streaming=True,
        ))
    return reqs


async def _run(
    engine: VLLMEngine, reqs: list[GenerateRequest], order: list[str]
) -> dict[str, tuple[int, ...]]:
    async def one(r: GenerateRequest) -> tuple[str, tuple[int, ...]]:
        toks: list[int] = []
        async for d in engine.generate(r):
            toks += d.token_ids
            order.extend([r.request_id] * len(d.token_ids))
        return r.request_id, tuple(toks)

    return dict(await asyncio.gather(*(one(r) for r in reqs)))


def _interrupted(order: list[str]) -> set[str]:
    """Requests whose tokens stopped for others' and then came again (paused, resumed)."""
    seen_end: set[str] = set()
    out: set[str] = set()
    prev = None
    for rid in order:
        if rid in seen_end:
            out.add(rid)
        if prev is not None and prev != rid:
            seen_end.add(prev)
        prev = rid
    return out


async def _serve(config: EngineConfig, reqs: list[GenerateRequest]
                 ) -> tuple[dict[str, tuple[int, ...]], list[str], str]:
    """Start an engine, run ``reqs`` at once, stop it: (tokens per request, the order tokens
    arrived in, the engine core's metrics text)."""
    engine = VLLMEngine(config, adapter_files=node_files(config))
    await engine.start()
    order: list[str] = []
    try:
        results = await _run(engine, reqs, order)
        return results, order, engine.core_metrics_text()
    finally:
        await engine.shutdown()


@pytest.fixture(scope="module")
async def reference(tiny_model: Path, adapters: list[AdapterRef]) -> dict[str, tuple[int, ...]]:
    """What stock scheduling answers (greedy), once for both tests: output is the same
    whether the engine core runs in-process or not, with prefix caching or without."""
    results, _, _ = await _serve(_config(tiny_model, "fcfs"), _requests(adapters))
    assert all(len(t) == 24 for t in results.values())
    return results


async def test_greedy_output_is_identical_with_and_without_pauses(tiny_model, adapters, reference):
    results, order, _ = await _serve(_config(tiny_model, "tokenflow"), _requests(adapters))
    # One batch slot: a stream that stops and later goes on was paused and resumed.
    assert len(_interrupted(order)) >= 3, order
    assert results == reference


@pytest.mark.heavy  # 85 s: three engines (host tier, disk tier, both)
async def test_paused_requests_come_back_from_the_offload_tiers(tiny_model, adapters, reference):
    """Prefix caching off, so a resumed request's KV can only come from our connector's tiers
    or be recomputed: with room in host memory every resume restores blocks; with a pool of
    about one block (spilling nowhere) resumes fall back to recompute. Greedy text never changes.
    Served configuration: vLLM's engine core in its own process and, on the CPU, the worker in
    another (the connector's two halves share only the tier folders)."""
    results, stats = {}, {}
    block_bytes = 4 * 32 * 2 * 64 * 2  # one layer's block of the tiny model is ~32 KiB; 2 layers
    for label, host_bytes in (("offload", 64 << 20), ("evicting", block_bytes)):
        config = _config(tiny_model, "tokenflow").model_copy(update={
            "prefix_caching": False, "kv_offload_host_bytes": host_bytes, "multiprocessing": True})
        results[label], order, core = await _serve(config, _requests(adapters))
        assert len(_interrupted(order)) >= 3, order
        # The engine core's lorafleet_* series reach this process (after each pause/resume).
        assert "lorafleet_scheduler_pauses_total" in core, core
        stats[label] = read_counters(core)
    off, ev = stats["offload"], stats["evicting"]
    print(f"\noffload: {off}\nevicting: {ev}")
    for label in ("offload", "evicting"):
        diff = {k: (v, reference[k]) for k, v in results[label].items() if v != reference[k]}
        assert not diff, (label, diff)
    out, into = "lorafleet_kv_offload_blocks{direction=out}", "lorafleet_kv_offload_blocks{direction=in}"
    bytes_out, bytes_in = (k.replace("_blocks", "_bytes") for k in (out, into))
    assert off[out] > 0 and off[into] > 0 and off["lorafleet_kv_offload_resumes{result=restored}"] >= 3
    assert off[bytes_in] > 0 and off[bytes_out] >= off[bytes_in]
    assert ev[out] > 0 and ev.get(into, 0) < off[into]
    assert ev.get("lorafleet_kv_offload_resumes{result=recomputed}", 0) > 0
    # The step-cost model learned from the real engine's own steps (prefill included) and
    # the engine core exported it.
    cost = {k.split("term=")[1].rstrip("}"): v for k, v in off.items()
            if k.startswith("lorafleet_scheduler_step_cost_seconds")}
    assert set(cost) == {"base", "per_sequence", "per_token"} and sum(cost.values()) > 0, off
    assert off["lorafleet_scheduler_full_batch_tokens_per_second"] > 0
