"""Resume after a pause: restore a context's KV from the host pool vs recompute it.

``python -m lorafleet.serving.kvcache.resume_bench --model-dir DIR [--tokens 1500]``

Boundary: a benchmark command (prints numbers, writes JSON). *Restore* copies the request's
KV blocks, shaped like vLLM's CPU paged cache for the model (layers x [blocks, 2, block, kv
heads, head dim], fp32), out to the connector's host tier (files on ``/dev/shm``, what
``PauseOffloadConnector`` writes: offload) and back into freshly chosen blocks through a
claim, as a resume does (restore). *Recompute* is what vLLM does today on resume: a real prefill of the same
number of tokens on the same model (in-process ``VLLMEngine``, one request, ``max_tokens=1``,
prefix caching defeated by a fresh prompt each time), minus a 1-token request's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from pathlib import Path


def measure_restore(layers: int, kv_heads: int, head_dim: int, tokens: int, block_size: int = 32,
                    repeats: int = 5) -> dict[str, float]:
    import torch

    from .connector import block_to_bytes, bytes_to_block, open_store

    n_blocks = -(-tokens // block_size)
    cache = [torch.randn(n_blocks * 2, 2, block_size, kv_heads, head_dim) for _ in range(layers)]
    src = list(range(n_blocks))
    dst = list(range(n_blocks, 2 * n_blocks))
    offload, restore = [], []
    store = open_store(f"resume-bench-{os.getpid()}", {"host_bytes": 4 * 2**30})
    try:
        for r in range(repeats):
            t0 = time.perf_counter()
            for i, b in enumerate(src):
                store.put(f"req/{r}/{i}", block_to_bytes(cache, b))
            offload.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            claims = store.claimed_prefix([f"req/{r}/{i}" for i in range(n_blocks)], "bench")
            assert len(claims) == n_blocks
            for b, claim in zip(dst, claims, strict=True):
                bytes_to_block(cache, b, claim.read_bytes())
                claim.unlink()
            restore.append(time.perf_counter() - t0)
            assert all(torch.equal(layer[s], layer[d])
                       for layer in cache for s, d in zip(src, dst, strict=True))
        used = store.host.used_bytes
    finally:
        shutil.rmtree(store.host.root, ignore_errors=True)
    return {"offload_s": statistics.median(offload), "restore_s": statistics.median(restore),
            "bytes": used / repeats}


async def measure_recompute(model_dir: str, tokens: int, repeats: int = 3) -> dict[str, float]:
    from lorafleet.serving.config import EngineConfig
    from lorafleet.serving.engine.protocol import GenerateRequest, SamplingOptions
    from lorafleet.serving.engine.vllm_engine import VLLMEngine

    engine = VLLMEngine(EngineConfig(
        model_dir=model_dir, served_model_name="bench", dtype="float32", max_model_len=2048,
        kv_cache_bytes=512 * 2**20, multiprocessing=True,
    ))
    await engine.start()

    async def once(n: int, salt: int) -> float:
        prompt = tuple((salt * 7919 + i * 31) % 30000 + 100 for i in range(n))
        req = GenerateRequest(request_id=f"rb-{n}-{salt}", prompt_token_ids=prompt,
                              sampling=SamplingOptions(max_tokens=1, temperature=0.0))
        t0 = time.perf_counter()
        async for _ in engine.generate(req):
            pass
        return time.perf_counter() - t0

    try:
        await once(tokens, 0)  # warm-up
        full = [await once(tokens, s) for s in range(1, repeats + 1)]
        tiny = [await once(1, s) for s in range(100, 100 + repeats)]
    finally:
        await engine.shutdown()
    return {"prefill_s": statistics.median(full) - statistics.median(tiny),
            "one_token_s": statistics.median(tiny)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    restore = measure_restore(cfg["num_hidden_layers"], kv_heads, head_dim, args.tokens)
    recompute = asyncio.run(measure_recompute(args.model_dir, args.tokens))
    out = {"tokens": args.tokens, **restore, **recompute,
           "restore_vs_recompute": recompute["prefill_s"] / restore["restore_s"]}
    print(f"context {args.tokens} tokens, KV {restore['bytes'] / 2**20:.1f} MiB (fp32)")
    print(f"  offload to host pool : {restore['offload_s'] * 1e3:8.1f} ms")
    print(f"  restore from pool    : {restore['restore_s'] * 1e3:8.1f} ms")
    print(f"  recompute (prefill)  : {recompute['prefill_s'] * 1e3:8.1f} ms")
    print(f"  recompute / restore  : {out['restore_vs_recompute']:8.1f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
