"""``y[:, slice_i] += scale * (x @ A_slot,i^T) @ B_slot,i^T`` for a heterogeneous batch, two ways.

* **Grouped** (prefill, or one slot): per active slot, one GEMM shrinks all of the layer's
  slices for that slot's rows, then one GEMM per slice expands. Rows of a slot are a
  contiguous slice when they can be (no copy), otherwise gathered once.
* **Packed** (decode: few rows, several slots): every active slot's A is concatenated into one
  ``[R, in]`` matrix, so one GEMM computes every row against every active adapter, a cached
  per-step mask keeps each row's own slot's columns (and applies ``scale``), and one GEMM
  per slice expands against the concatenated B. Each active adapter's weights are read
  once per step, with no per-token copy and no Python loop over slots. The price is
  ``rows x active slots`` times the useful FLOPs, which is why it is only for small batches.

Ranks are the adapters' live ranks (see ``packing``), never ``max_lora_rank``.
"""

from __future__ import annotations

import torch

from .packing import LayerPack
from .plan import StepPlan

PACKED_MAX_WORK = 2048
"""Use the packed path while ``rows x active slots`` is at most this (tuned with
``lorafleet bench lora-ops``); above it the wasted FLOPs outweigh the saved calls."""


def choose_packed(plan: StepPlan) -> bool:
    slots = len(plan.groups)
    return slots > 1 and plan.n * slots <= PACKED_MAX_WORK


def _weights(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w if w.dtype == dtype else w.to(dtype)


def apply_grouped(
    y: torch.Tensor, x: torch.Tensor, pack: LayerPack, plan: StepPlan, scale: float,
    output_slices: tuple[int, ...],
) -> None:
    n = plan.n
    for slot, rows in plan.groups:
        ranks = pack.ranks[slot]
        if not sum(ranks):
            continue
        contiguous = isinstance(rows, slice)
        whole = contiguous and rows.start == 0 and rows.stop == n
        xs = x if whole else x[rows]
        h = torch.mm(xs, _weights(pack.a_t[slot], x.dtype))
        if scale != 1.0:
            h.mul_(scale)
        col = offset = 0
        for i, size in enumerate(output_slices):
            r = ranks[i]
            if r:
                b_t = _weights(pack.b_t[slot][i], h.dtype)
                if contiguous:
                    target = y[:, offset : offset + size] if whole else y[rows, offset : offset + size]
                    target.addmm_(h[:, col : col + r], b_t)
                else:
                    y[:, offset : offset + size].index_add_(0, rows, h[:, col : col + r] @ b_t)
            col += r
            offset += size


def apply_packed(
    y: torch.Tensor, x: torch.Tensor, pack: LayerPack, plan: StepPlan, scale: float,
    output_slices: tuple[int, ...],
) -> None:
    packed = pack.packed_for(plan.slots)
    if packed is None:
        return
    h = torch.mm(x, _weights(packed.a_t, x.dtype))
    h.mul_(plan.mask(packed.key, packed.col_slot, scale, h.dtype))
    offset = 0
    for (first, last, b_t), size in zip(packed.slices, output_slices, strict=True):
        if b_t is not None:
            y[:, offset : offset + size].addmm_(h[:, first:last], _weights(b_t, h.dtype))
        offset += size


def apply_lora_linear(
    y: torch.Tensor, x: torch.Tensor, pack: LayerPack, plan: StepPlan, scale: float,
    output_slices: tuple[int, ...],
) -> None:
    """Add every row's adapter contribution to ``y`` in place (base rows get nothing)."""
    if not plan.groups:
        return
    if choose_packed(plan):
        apply_packed(y, x, pack, plan, scale, output_slices)
    else:
        apply_grouped(y, x, pack, plan, scale, output_slices)
