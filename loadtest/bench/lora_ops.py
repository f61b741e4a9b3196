"""``bench lora-ops``: the CPU LoRA ops in isolation, ours vs vLLM's stock vs the base matmul.

Boundary: in-process compute and timing, no servers. For each SmolLM2-135M LoRA-wrapped layer
shape (qkv, o, gate_up, down) and each case (decode: 1, 16, 64 rows; prefill: 1,600 rows; 1 or
8 active slots holding adapters of ranks 8/16/32 in buffers padded to ``max_lora_rank`` 32) it
times one ``add_lora_linear`` call three ways:

* ``ours``: :class:`~lorafleet.serving.engine.lora_cpu.wrapper.PunicaWrapperFleetCPU` in steady
  state (plan built once per step, rank-trimmed weights already cached);
* ``stock``: vLLM's own torch ops as its CPU wrapper calls them (a fresh copy of the module, so
  our plugin's patching cannot leak in);
* ``base``: the layer's own dense matmul on the same rows (what the adapter is "on top of").

and computes the **memory-bound floor**: the bytes one call must move (rows in, output read and
written, each active adapter's live weights read once) divided by this machine's streaming
read bandwidth, measured here over a buffer far larger than the caches. A model step is 30
layers x these 4 shapes, so the table also sums them into a per-step estimate.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30
SHAPES: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTER, INTER)),
    "down": (INTER, (HIDDEN,)),
}
MAX_RANK, MAX_LORAS = 32, 8
RANKS = (8, 16, 32)


@dataclass(frozen=True)
class Case:
    phase: str
    rows: int
    slots: int


CASES = tuple(
    [Case("decode", n, s) for n in (1, 16, 64) for s in (1, 8) if n >= s]
    + [Case("prefill", 1600, s) for s in (1, 8)]
)


def stream_bandwidth(mib: int = 512, repeats: int = 3) -> float:
    """Bytes/s of a streaming read (``sum``) over ``mib`` MiB: the memory-bound roofline."""
    buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    buf.sum()
    best = min(_elapsed(buf.sum) for _ in range(repeats))
    return buf.numel() * 4 / best


def _elapsed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timeit(fn: Callable[[], object], budget_s: float) -> float:
    """Median seconds per call over as many calls as fit in ``budget_s`` (at least 5)."""
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 5 or time.perf_counter() < deadline:
        samples.append(_elapsed(fn))
        if len(samples) >= 2000:
            break
    return statistics.median(samples)


def _layer(in_f: int, outs: tuple[int, ...], dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    a_st, b_st = [], []
    for out in outs:
        a = torch.zeros(MAX_LORAS, 1, MAX_RANK, in_f)
        b = torch.zeros(MAX_LORAS, 1, out, MAX_RANK)
        for s in range(MAX_LORAS):
            r = RANKS[s % len(RANKS)]
            a[s, 0, :r] = torch.randn(r, in_f, generator=g) * 0.02
            b[s, 0, :, :r] = torch.randn(out, r, generator=g) * 0.02
        a_st.append(a.to(dtype))
        b_st.append(b.to(dtype))
    weight = (torch.randn(sum(outs), in_f, generator=g) * 0.02).to(dtype)
    return tuple(a_st), tuple(b_st), weight


def _indices(case: Case) -> list[int]:
    """Each active slot owns a contiguous run of rows for prefill, round-robin rows for decode."""
    if case.phase == "prefill":
        per = case.rows // case.slots
        return [min(t // per, case.slots - 1) for t in range(case.rows)]
    return [t % case.slots for t in range(case.rows)]


def floor_bytes(case: Case, in_f: int, outs: tuple[int, ...], elem: int) -> int:
    active = {s % MAX_LORAS for s in range(case.slots)}
    weights = sum(RANKS[s % len(RANKS)] * (in_f + out) for s in active for out in outs)
    return elem * (case.rows * in_f + 2 * case.rows * sum(outs) + weights)


def measure_case(case: Case, name: str, layer: tuple, dtype: torch.dtype, stock: Any,
                 budget_s: float) -> dict[str, Any]:
    """Seconds per call: ours, stock, the base matmul, and our per-step plan."""
    from vllm.lora.layers.utils import LoRAMapping

    from lorafleet.serving.engine.lora_cpu.wrapper import PunicaWrapperFleetCPU

    in_f, outs = SHAPES[name]
    a_st, b_st, weight = layer
    idx_list = _indices(case)
    idx = torch.tensor(idx_list)
    ids = tuple(i + 1 for i in idx_list)
    slot_ids = list(range(1, MAX_LORAS + 1))
    wrapper = PunicaWrapperFleetCPU(max_num_batched_tokens=2048, max_batches=256, device="cpu")

    def plan() -> None:
        mapping = LoRAMapping(ids, ids, is_prefill=case.phase == "prefill")
        wrapper.update_metadata(mapping, slot_ids, MAX_LORAS, 49152)

    plan()
    x = torch.randn(case.rows, in_f).to(dtype)
    y = torch.zeros(case.rows, sum(outs), dtype=dtype)

    def ours() -> None:
        wrapper.add_lora_linear(y, x, a_st, b_st, 1.0, outs)

    def stock_call() -> None:  # what vLLM's PunicaWrapperCPU does per slice
        off = 0
        for a, b, out in zip(a_st, b_st, outs, strict=True):
            buf = torch.zeros(case.rows, MAX_RANK, dtype=torch.float32)
            stock.bgmv_shrink(x, a, buf, idx, 1.0)
            stock.bgmv_expand_slice(buf, b, y, idx, off, out, add_inputs=True)
            off += out

    return {"ours_s": timeit(ours, budget_s), "stock_s": timeit(stock_call, budget_s),
            "base_s": timeit(lambda: x @ weight.T, budget_s), "plan_s": timeit(plan, budget_s / 3)}


def measure(dtype: torch.dtype = torch.float32, budget_s: float = 0.3,
            console: Console | None = None) -> dict[str, Any]:
    from lorafleet.serving.engine.lora_cpu import ops

    stock = ops.pristine_stock_ops()
    bandwidth = stream_bandwidth()
    elem = torch.tensor([], dtype=dtype).element_size()
    layers = {name: _layer(in_f, outs, dtype, i) for i, (name, (in_f, outs)) in enumerate(SHAPES.items())}
    rows: list[dict[str, Any]] = []
    work = [(c, n) for c in CASES for n in SHAPES]
    for case, name in track(work, description="lora-ops", console=console, transient=True):
        in_f, outs = SHAPES[name]
        rows.append({
            **asdict(case), "layer": name,
            **measure_case(case, name, layers[name], dtype, stock, budget_s),
            "floor_s": floor_bytes(case, in_f, outs, elem) / bandwidth,
        })
    return {"dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "bandwidth_gb_s": bandwidth / 1e9, "max_lora_rank": MAX_RANK, "ranks": RANKS,
            "cases": rows, "steps": per_step(rows)}


def per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A model step's LoRA cost: every layer shape x ``LAYERS``, plus one plan per step."""
    out = []
    for case in CASES:
        mine = [r for r in rows if (r["phase"], r["rows"], r["slots"]) == (case.phase, case.rows, case.slots)]
        step = {k: LAYERS * sum(r[k] for r in mine) for k in ("ours_s", "stock_s", "base_s", "floor_s")}
        step["ours_s"] += mine[0]["plan_s"]
        out.append({**asdict(case), **step})
    return out


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def print_tables(doc: dict[str, Any], console: Console) -> None:
    table = Table(title=f"lora-ops per call (ms), {doc['dtype']}, {doc['threads']} threads, "
                        f"ranks {doc['ranks']} in max_lora_rank {doc['max_lora_rank']}; "
                        f"floor at {doc['bandwidth_gb_s']:.1f} GB/s")
    for col in ("case", "layer", "ours", "stock", "base matmul", "floor", "stock/ours", "ours/floor"):
        table.add_column(col, justify="right")
    for r in doc["cases"]:
        table.add_row(f"{r['phase']} {r['rows']}x{r['slots']} slots", r["layer"], _ms(r["ours_s"]),
                      _ms(r["stock_s"]), _ms(r["base_s"]), _ms(r["floor_s"]),
                      f"{r['stock_s'] / r['ours_s']:.1f}x", f"{r['ours_s'] / r['floor_s']:.2f}x")
    console.print(table)
    step = Table(title=f"per model step ({LAYERS} layers x 4 shapes; ms)")
    for col in ("case", "ours", "stock", "base matmuls", "floor", "stock/ours", "ours/base",
                "ours/floor"):
        step.add_column(col, justify="right")
    for r in doc["steps"]:
        step.add_row(f"{r['phase']} {r['rows']}x{r['slots']} slots", _ms(r["ours_s"]), _ms(r["stock_s"]),
                     _ms(r["base_s"]), _ms(r["floor_s"]), f"{r['stock_s'] / r['ours_s']:.1f}x",
                     f"{r['ours_s'] / r['base_s']:.2f}x", f"{r['ours_s'] / r['floor_s']:.2f}x")
    console.print(step)


def run_lora_ops(out_dir: Path, quick: bool, console: Console, threads: int | None = None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = measure(budget_s=0.08 if quick else 0.3, console=console)
    path = out_dir / "lora-ops.json"
    path.write_text(json.dumps(doc, indent=1))
    print_tables(doc, console)
    console.print(f"results: {path}")
    return doc
