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
read bandwidth, measured here over a buffer larger than the caches.

Per-call times are *hot* (the same layer called again and again keeps its weights in cache,
so they can beat a DRAM floor). The honest figure is the **model step**: 30 layers x 4 shapes,
each layer with its own base weights and its own adapters (the working set of SmolLM2 plus
eight adapters, larger than the caches), run as vLLM runs it, base matmul then LoRA, layer
after layer. LoRA's share of a step is ``step(base + ours) - step(base)``, compared with the
floor of the bytes the adapters add to the step.
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
MAX_RANK, MAX_LORAS = 32, 16
RANKS = (8, 16, 32)


@dataclass(frozen=True)
class Case:
    phase: str
    rows: int
    slots: int


CASES = tuple(
    [Case("decode", n, s) for n in (1, 16, 64) for s in (1, 8, 16) if n >= s]
    + [Case("prefill", 1600, s) for s in (1, 8)]
)
"""16 decode rows over 16 slots is issue 20's 32- and 128-adapter mixes with as many slots as
streams: every row its own adapter, so a step reads 16 adapters' weights."""


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


def _wrapper_for(case: Case) -> tuple[Any, Callable[[], None]]:
    """Our wrapper with ``case``'s mapping, and the per-step call that (re)builds its plan."""
    from vllm.lora.layers.utils import LoRAMapping

    from lorafleet.serving.engine.lora_cpu.wrapper import PunicaWrapperFleetCPU

    ids = tuple(i + 1 for i in _indices(case))
    slot_ids = list(range(1, MAX_LORAS + 1))
    wrapper = PunicaWrapperFleetCPU(max_num_batched_tokens=2048, max_batches=256, device="cpu")

    def plan() -> None:
        mapping = LoRAMapping(ids, ids, is_prefill=case.phase == "prefill")
        wrapper.update_metadata(mapping, slot_ids, MAX_LORAS, 49152)

    plan()
    return wrapper, plan


def measure_case(case: Case, name: str, layer: tuple, dtype: torch.dtype, stock: Any,
                 budget_s: float) -> dict[str, Any]:
    """Seconds per call (hot): ours, stock, the base matmul, and our per-step plan."""
    in_f, outs = SHAPES[name]
    a_st, b_st, weight = layer
    idx = torch.tensor(_indices(case))
    wrapper, plan = _wrapper_for(case)
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

    def base() -> None:
        x @ weight.T

    return {"ours_s": timeit(ours, budget_s), "stock_s": timeit(stock_call, budget_s),
            "base_s": timeit(base, budget_s), "plan_s": timeit(plan, budget_s / 3)}


def measure_step(case: Case, model: list[dict[str, tuple]], dtype: torch.dtype,
                 repeats: int) -> dict[str, float]:
    """Median seconds of a model step's linear layers: base only, and base then our LoRA."""
    wrapper, plan = _wrapper_for(case)
    xs = {name: torch.randn(case.rows, in_f).to(dtype) for name, (in_f, _) in SHAPES.items()}

    def step(lora: bool) -> None:
        if lora:
            plan()
        for layer in model:
            for name, (a_st, b_st, weight) in layer.items():
                y = xs[name] @ weight.T
                if lora:
                    wrapper.add_lora_linear(y, xs[name], a_st, b_st, 1.0, SHAPES[name][1])

    step(True)  # packs built once (steady state)
    base = statistics.median(_elapsed(lambda: step(False)) for _ in range(repeats))
    with_lora = statistics.median(_elapsed(lambda: step(True)) for _ in range(repeats))
    return {"step_base_s": base, "step_lora_s": with_lora}


def measure_activation(model: list[dict[str, tuple]], repeats: int) -> dict[str, float]:
    """Seconds to put a new adapter into a slot across a model step's layers, in two parts:
    vLLM's write (``reset_lora`` zeroes the slot, then the adapter's weights are copied in,
    as ``set_lora`` does) and our refresh (the next step's re-trim of that slot, ``packing``).
    Each activation writes a rank-16 adapter into slot 0, on packs built beforehand."""
    from lorafleet.serving.engine.lora_cpu.packing import PackCache, note_slot_written

    cache = PackCache()
    for layer in model:
        for a_st, b_st, _ in layer.values():
            cache.get(a_st, b_st)
    g = torch.Generator().manual_seed(7)
    news = {name: ([torch.randn(16, in_f, generator=g) * 0.02 for _ in outs],
                   [torch.randn(out, 16, generator=g) * 0.02 for out in outs])
            for name, (in_f, outs) in SHAPES.items()}

    def write() -> None:
        for layer in model:
            for name, (a_st, b_st, _) in layer.items():
                for a, b, new_a, new_b in zip(a_st, b_st, *news[name], strict=True):
                    a[0].zero_()
                    b[0].zero_()
                    a[0, 0, :16].copy_(new_a)
                    b[0, 0, :, :16].copy_(new_b)
                note_slot_written(a_st[0], 0)

    def refresh() -> None:
        for layer in model:
            for a_st, b_st, _ in layer.values():
                cache.get(a_st, b_st)

    writes, refreshes = [], []
    for _ in range(repeats):
        writes.append(_elapsed(write))
        refreshes.append(_elapsed(refresh))
    return {"write_s": statistics.median(writes), "refresh_s": statistics.median(refreshes),
            "full_rebuilds": float(cache.rebuilds - LAYERS * len(SHAPES))}


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
    model = [{name: _layer(in_f, outs, dtype, 100 + 4 * i + j)
              for j, (name, (in_f, outs)) in enumerate(SHAPES.items())} for i in range(LAYERS)]
    steps = per_step(rows)
    for step in track(steps, description="model steps", console=console, transient=True):
        case = Case(step["phase"], step["rows"], step["slots"])
        step.update(measure_step(case, model, dtype, repeats=3 if budget_s < 0.2 else 7))
        step["step_ours_s"] = step["step_lora_s"] - step["step_base_s"]
    activation = measure_activation(model, repeats=3 if budget_s < 0.2 else 7)
    return {"dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "bandwidth_gb_s": bandwidth / 1e9, "max_lora_rank": MAX_RANK, "ranks": RANKS,
            "cases": rows, "steps": steps, "activation": activation}


def per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-call figures summed over a step (every shape x ``LAYERS``, one plan), as a baseline
    for the measured steps."""
    out = []
    for case in CASES:
        mine = [r for r in rows if (r["phase"], r["rows"], r["slots"]) == (case.phase, case.rows, case.slots)]
        keys = ("ours_s", "stock_s", "base_s", "floor_s")
        step = {k: LAYERS * sum(r[k] for r in mine) for k in keys}
        step["ours_s"] += mine[0]["plan_s"]
        out.append({**asdict(case), **step})
    return out


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def print_tables(doc: dict[str, Any], console: Console) -> None:
    table = Table(title=f"lora-ops per call, hot (ms), {doc['dtype']}, {doc['threads']} threads, "
                        f"ranks {doc['ranks']} in max_lora_rank {doc['max_lora_rank']}; "
                        f"floor at {doc['bandwidth_gb_s']:.1f} GB/s")
    for col in ("case", "layer", "ours", "stock", "base matmul", "floor", "stock/ours"):
        table.add_column(col, justify="right")
    for r in doc["cases"]:
        table.add_row(f"{r['phase']} {r['rows']}x{r['slots']} slots", r["layer"], _ms(r["ours_s"]),
                      _ms(r["stock_s"]), _ms(r["base_s"]), _ms(r["floor_s"]),
                      f"{r['stock_s'] / r['ours_s']:.1f}x")
    console.print(table)
    step = Table(title=f"per model step ({LAYERS} layers x 4 shapes, distinct weights; ms)")
    for col in ("case", "stock (sum of calls)", "base step", "base + ours step", "ours in step",
                "floor", "ours/floor", "ours/base"):
        step.add_column(col, justify="right")
    for r in doc["steps"]:
        step.add_row(f"{r['phase']} {r['rows']}x{r['slots']} slots", _ms(r["stock_s"]),
                     _ms(r["step_base_s"]), _ms(r["step_lora_s"]), _ms(r["step_ours_s"]),
                     _ms(r["floor_s"]), f"{r['step_ours_s'] / r['floor_s']:.2f}x",
                     f"{r['step_ours_s'] / r['step_base_s']:.2f}x")
    console.print(step)
    act = doc.get("activation")
    if act:
        console.print(f"one adapter into a slot ({LAYERS} layers x 4 shapes, {MAX_LORAS} slots): "
                      f"vLLM's write {_ms(act['write_s'])} ms, our refresh {_ms(act['refresh_s'])} "
                      f"ms (full rebuilds {act['full_rebuilds']:g})")


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
