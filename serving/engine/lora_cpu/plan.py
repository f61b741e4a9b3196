"""Per-step token -> slot plan, computed once per forward pass and shared by every layer.

vLLM tells the Punica wrapper the batch's LoRA mapping once per step (``update_metadata``);
every LoRA-wrapped layer of the step then sees the same tokens in the same order. So the
bookkeeping that does not depend on a layer's weights (which slots are active, which rows each
slot owns, whether the rows are contiguous) is done here once, in plain Python over at most
``max_num_batched_tokens`` integers, and never per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Rows = slice | torch.Tensor
"""A slot's rows in the batch: a ``slice`` when they are contiguous (no copy), else an index tensor."""


@dataclass
class StepPlan:
    """Which rows of this step's batch use which LoRA slot (``-1`` rows use none)."""

    indices: torch.Tensor
    """``[n]`` long tensor: each row's slot, ``-1`` for base-model rows."""
    groups: tuple[tuple[int, Rows], ...]
    """One ``(slot, rows)`` per active slot, in slot order."""
    masks: dict[object, torch.Tensor] = field(default_factory=dict)
    """Per-step cache of the packed path's row/column masks, keyed by a layer's layout."""

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(slot for slot, _ in self.groups)

    def mask(self, key: object, col_slot: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """``[n, R]``: ``scale`` where column ``c`` belongs to row ``t``'s slot, else 0."""
        full_key = (key, scale, dtype)
        cached = self.masks.get(full_key)
        if cached is None:
            cached = (self.indices.unsqueeze(1) == col_slot.unsqueeze(0)).to(dtype)
            if scale != 1.0:
                cached.mul_(scale)
            self.masks[full_key] = cached
        return cached


def build_plan(indices: torch.Tensor) -> StepPlan:
    """Group the rows of one step by slot; ``indices`` is vLLM's per-token slot tensor."""
    indices = indices.to(torch.long)
    rows_by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(indices.tolist()):
        if slot >= 0:
            rows_by_slot.setdefault(slot, []).append(row)
    groups: list[tuple[int, Rows]] = []
    for slot in sorted(rows_by_slot):
        rows = rows_by_slot[slot]
        if rows[-1] - rows[0] + 1 == len(rows):
            groups.append((slot, slice(rows[0], rows[-1] + 1)))
        else:
            groups.append((slot, torch.tensor(rows, dtype=torch.long)))
    return StepPlan(indices=indices, groups=tuple(groups))
