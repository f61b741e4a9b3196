"""Resume after a pause: restore a context's KV from the host pool vs recompute it.

``python -m lorafleet.serving.kvcache.resume_bench --model-dir DIR [--tokens 1500]
[--device cpu|cuda] [--no-recompute]``

Boundary: a benchmark command (prints numbers, writes JSON). *Restore* moves the request's
KV blocks, shaped like vLLM's paged cache for the model (layers x [blocks, 2, block, kv
heads, head dim] on the CPU; [2, blocks, ...] as FlashAttention keeps it on CUDA), the way
``PauseOffloadConnector`` does: out through :class:`~.transfer.BlockCopier` to the host tier
(files on ``/dev/shm``: offload), and back into freshly chosen blocks through a claim
(restore). On CUDA it also measures *overlap*: a stand-in forward pass (matmuls on the
compute stream) alone, and again while a restore runs on the side stream; the second minus
the first is what the restore costs the step, against the restore's own time. *Recompute* is
what vLLM does on resume without us: a real prefill of the same number of tokens on the
same model (in-process ``VLLMEngine``, CPU build; one request, ``max_tokens=1``, prefix
caching defeated by a fresh prompt each time), minus a 1-token request's latency.
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
from typing import Any


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure_restore(layers: int, kv_heads: int, head_dim: int, tokens: int, block_size: int = 32,
                    repeats: int = 5, device: str = "cpu") -> dict[str, float]:
    import torch

    from .connector import open_store
    from .transfer import BlockCopier, block_bytes

    n_blocks = -(-tokens // block_size)
    total = 2 * n_blocks
    shape = ((total, 2, block_size, kv_heads, head_dim) if device == "cpu"
             else (2, total, block_size, kv_heads, head_dim))
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cache = [torch.randn(shape, device=device).to(dtype) for _ in range(layers)]
    copier = BlockCopier.for_device(cache, total)
    d = copier.layout.block_dim
    src = list(range(n_blocks))
    dst = list(range(n_blocks, total))
    offload, restore, overlap = [], [], []
    store = open_store(f"resume-bench-{os.getpid()}", {"host_bytes": 4 * 2**30})

    def restore_once(r: int) -> float:
        t0 = time.perf_counter()
        claims = store.claimed_prefix([f"req/{r}/{i}" for i in range(n_blocks)], "bench")
        assert len(claims) == n_blocks
        host = copier.pack([c.read_bytes() for c in claims])
        pending = copier.load(dst, host)
        copier.wait_all()
        pending.wait()
        _sync(device)
        for c in claims:
            c.unlink()
        copier.buffers.give(host)
        return time.perf_counter() - t0

    try:
        for r in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            pending = copier.save(src)
            copier.wait_all()
            for i in range(n_blocks):
                store.put(f"req/{r}/{i}", block_bytes(pending.wait()[i]))
            copier.buffers.give(pending.host)
            offload.append(time.perf_counter() - t0)
            restore.append(restore_once(r))
            idx_s, idx_d = torch.tensor(src, device=device), torch.tensor(dst, device=device)
            assert all(torch.equal(layer.index_select(d, idx_s), layer.index_select(d, idx_d))
                       for layer in cache)
        if device == "cuda":
            overlap = _overlap(copier, store, dst, n_blocks, repeats)
        used = store.host.used_bytes
    finally:
        shutil.rmtree(store.host.root, ignore_errors=True)
    out = {"offload_s": statistics.median(offload), "restore_s": statistics.median(restore),
           "bytes": used / repeats, "pinned": float(copier.buffers.pin)}
    if overlap:
        out.update(overlap[0])
    return out


def _overlap(copier: Any, store: Any, dst: list[int], n_blocks: int, repeats: int
             ) -> list[dict[str, float]]:
    """A stand-in forward (matmuls, ~the restore's length) alone, then with a restore
    running on the side stream at the same time: the step time each gives."""
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def forward(n: int) -> None:
        for _ in range(n):
            a @ a

    forward(3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward(20)
    torch.cuda.synchronize()
    per_mm = (time.perf_counter() - t0) / 20
    alone, together = [], []
    for r in range(repeats):
        n = 20
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward(n)
        torch.cuda.synchronize()
        alone.append(time.perf_counter() - t0)
        claims = store.claimed_prefix([f"req/{r}/{i}" for i in range(n_blocks)], f"ov{r}")
        host = copier.pack([c.read_bytes() for c in claims])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pending = copier.load(dst, host)  # side stream
        forward(n)  # compute stream, concurrently
        copier.wait_all()
        pending.wait()
        torch.cuda.synchronize()
        together.append(time.perf_counter() - t0)
        for c in claims:
            c.unlink()
        copier.buffers.give(host)
    return [{"forward_alone_s": statistics.median(alone),
             "forward_with_restore_s": statistics.median(together),
             "matmul_s": per_mm}]


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
    ap.add_argument("--model-dir", required=True,
                    help="a model folder (only config.json is read unless recompute runs)")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--no-recompute", action="store_true",
                    help="skip the vLLM prefill (a machine without the vLLM build)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    restore = measure_restore(cfg["num_hidden_layers"], kv_heads, head_dim, args.tokens,
                              device=args.device)
    out: dict[str, Any] = {"tokens": args.tokens, "device": args.device, **restore}
    dtype = "fp32" if args.device == "cpu" else "bf16"
    print(f"context {args.tokens} tokens, KV {restore['bytes'] / 2**20:.1f} MiB ({dtype}), "
          f"{args.device}, host buffers {'pinned' if restore['pinned'] else 'pageable'}")
    print(f"  offload to host pool : {restore['offload_s'] * 1e3:8.1f} ms")
    print(f"  restore from pool    : {restore['restore_s'] * 1e3:8.1f} ms")
    if "forward_alone_s" in restore:
        print(f"  stand-in forward     : {restore['forward_alone_s'] * 1e3:8.1f} ms alone, "
              f"{restore['forward_with_restore_s'] * 1e3:.1f} ms with a restore beside it")
    if not args.no_recompute:
        recompute = asyncio.run(measure_recompute(args.model_dir, args.tokens))
        out.update(recompute, restore_vs_recompute=recompute["prefill_s"] / restore["restore_s"])
        print(f"  recompute (prefill)  : {recompute['prefill_s'] * 1e3:8.1f} ms")
        print(f"  recompute / restore  : {out['restore_vs_recompute']:8.1f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
