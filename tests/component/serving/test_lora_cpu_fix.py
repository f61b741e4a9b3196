"""Regression test for vLLM 0.32's CPU LoRA bug, against a Hugging Face + PEFT reference.

In a mixed batch, a base-model row carries LoRA index -1; vLLM's torch ops used it as a
Python index, applying the adapter of the *last* slot to base rows. With ``max_loras=2``
and two adapters in the batch, the last slot is occupied, so the bug shows. Our plugin
(``lorafleet.serving.engine.lora_cpu``) must make every row match HF+PEFT exactly.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
import torch

from lorafleet.serving.config import EngineConfig
from lorafleet.serving.engine.protocol import AdapterRef, GenerateRequest, SamplingOptions
from lorafleet.serving.engine.vllm_engine import VLLMEngine

from .conftest import TINY_MODEL_NAME

pytestmark = pytest.mark.vllm

NEW_TOKENS = 8
PROMPTS = 4


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(100, vocab - 100) for _ in range(12 + 3 * i)] for i in range(PROMPTS)]


@pytest.fixture(scope="module")
def two_adapters(adapter_dirs: dict[str, Path]) -> dict[str, Path]:
    return {k: adapter_dirs[k] for k in ("ad-r4-qv", "ad-r8-all")}


@pytest.fixture(scope="module")
def hf_reference(tiny_model: Path, two_adapters: dict[str, Path]) -> dict[tuple[str, int], list[int]]:
    """Greedy continuations from transformers + PEFT: (model, prompt index) -> new token ids."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    names = list(two_adapters)
    model = PeftModel.from_pretrained(base, str(two_adapters[names[0]]), adapter_name=names[0])
    model.load_adapter(str(two_adapters[names[1]]), adapter_name=names[1])
    model.eval()
    out: dict[tuple[str, int], list[int]] = {}

    def greedy(ids: list[int]) -> list[int]:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
        return y[0, len(ids):].tolist()

    prompts = _prompts(base.config.vocab_size)
    for i, ids in enumerate(prompts):
        with model.disable_adapter():
            out[("base", i)] = greedy(ids)
        for name in names:
            model.set_adapter(name)
            out[(name, i)] = greedy(ids)
    out[("vocab", 0)] = [base.config.vocab_size]
    return out


async def _mixed_batch(model_dir: Path, adapters: dict[str, Path], vocab: int,
                       stock_ops: bool) -> dict[tuple[str, int], list[int]]:
    previous = os.environ.get("LORAFLEET_STOCK_LORA_OPS")
    os.environ["LORAFLEET_STOCK_LORA_OPS"] = "1" if stock_ops else "0"
    engine = VLLMEngine(EngineConfig(
        model_dir=str(model_dir), served_model_name=TINY_MODEL_NAME, dtype="float32",
        max_model_len=256, max_loras=2, max_lora_rank=16, max_cpu_loras=4,
        kv_cache_bytes=32 * 2**20,
    ), replica_id="stock" if stock_ops else "fixed")
    try:
        await engine.start()
        refs = {n: AdapterRef(f"t/{n}@0", str(p)) for n, p in adapters.items()}

        async def run(name: str, i: int, ids: list[int]) -> tuple[tuple[str, int], list[int]]:
            req = GenerateRequest(f"{name}-{i}-{stock_ops}", tuple(ids),
                                  SamplingOptions(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
                                  refs.get(name))
            toks: list[int] = []
            async for d in engine.generate(req):
                toks.extend(d.token_ids)
            return (name, i), toks

        for ref in refs.values():
            await engine.load_adapter(ref)
        jobs = [run(n, i, ids) for i, ids in enumerate(_prompts(vocab)) for n in ("base", *adapters)]
        return dict(await asyncio.gather(*jobs))
    finally:
        await engine.shutdown()
        if previous is None:
            os.environ.pop("LORAFLEET_STOCK_LORA_OPS", None)
        else:
            os.environ["LORAFLEET_STOCK_LORA_OPS"] = previous


async def test_mixed_batch_matches_hf_peft_with_our_ops(tiny_model, two_adapters, hf_reference):
    vocab = hf_reference[("vocab", 0)][0]
    got = await _mixed_batch(tiny_model, two_adapters, vocab, stock_ops=False)
    mismatches = {k: (v, hf_reference[k]) for k, v in got.items() if v != hf_reference[k]}
    assert not mismatches, mismatches


async def test_stock_ops_corrupt_base_rows(tiny_model, two_adapters, hf_reference):
    """Documents the upstream bug on the pinned vLLM: base rows drift from the reference."""
    vocab = hf_reference[("vocab", 0)][0]
    got = await _mixed_batch(tiny_model, two_adapters, vocab, stock_ops=True)
    base_ok = sum(got[("base", i)] == hf_reference[("base", i)] for i in range(PROMPTS))
    assert base_ok < PROMPTS, "stock vLLM no longer shows the -1 index bug: drop the plugin's fix?"
