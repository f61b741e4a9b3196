"""Rank-trimmed copies of a layer's LoRA weights, rebuilt only when vLLM rewrites the slots.

vLLM keeps each wrapped layer's adapters in stacked buffers padded to ``max_lora_rank``:
``lora_a[i]`` is ``[slots, 1, max_rank, in]`` and ``lora_b[i]`` ``[slots, 1, out_i, max_rank]``
for slice ``i`` (merged projections such as qkv or gate_up have several slices). A rank-8
adapter in a rank-64 buffer is 7/8 zeros; an adapter that does not target the layer is all
zeros. :class:`LayerPack` holds, per slot, only the live ranks:

* ``a_t[slot]``: ``[in, sum_i r_i]``, every slice's A stacked (and transposed, contiguous),
  so one matmul shrinks all slices;
* ``b_t[slot][i]``: ``[r_i, out_i]`` (transposed, contiguous), so each expand is one ``addmm_``
  straight into the output's columns.

and, for the packed (decode) path, every active slot's A concatenated into one matrix, so that
one matmul reads each active adapter's weights once for the whole step.

Freshness: vLLM writes slots in place (``set_lora``/``reset_lora``), which bumps the buffers'
version counters (views share their base's counter), so a pack is keyed by those counters
and refreshed on the first step after a load or unload, never on steady-state steps. Every
vLLM 0.32 slot write starts with ``BaseLinearLayerWithLoRA.reset_lora(slot)``, which the
plugin wraps to call :func:`note_slot_written`: then only the written slots are re-trimmed
(a full rebuild of SmolLM2's 120 wrapped layers costs ~0.2 s, one slot ~1/8 of that). A
change the note did not see (any other in-place write) falls back to a full rebuild.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


def _any_nonzero(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Whether ``t`` has a non-zero (or NaN) element along ``dim``.

    ``amax``/``amin`` rather than ``ne(0).any()``: no full-size temporary, and 10-15x faster on
    our CPU (``any`` over a bool tensor's rows was 370 us for one slot of gate_up's B, 20 us
    this way), which made the re-trim after every slot write cost 48 ms a model step against
    vLLM's own 7.6 ms for the write (``bench lora-ops``)."""
    return t.amax(dim=dim).ne(0) | t.amin(dim=dim).ne(0)


def live_ranks(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Per slot, 1 + the last rank index whose A row and B column are both non-zero (0 if none)."""
    a_live = _any_nonzero(a[:, 0], dim=-1)  # [slots, max_rank]
    b_live = _any_nonzero(b[:, 0], dim=-2)  # [slots, max_rank]
    live = a_live & b_live
    positions = torch.arange(1, live.shape[1] + 1)
    return (live * positions).amax(dim=1).tolist()


@dataclass
class Packed:
    """All active slots of one step concatenated (the decode path's operands)."""

    a_t: torch.Tensor
    """``[in, R]``: columns ordered slice-major, then slot."""
    col_slot: torch.Tensor
    """``[R]``: the slot owning each column of ``a_t`` (and of the shrunk activations)."""
    slices: tuple[tuple[int, int, torch.Tensor | None], ...]
    """Per output slice: ``(first, last)`` columns of the shrunk activations and ``B^T``
    ``[last - first, out_i]`` (None when no active slot targets the slice)."""
    key: tuple


@dataclass
class LayerPack:
    owner: torch.Tensor
    """The layer's first A buffer (identity check: ``id`` alone could be reused)."""
    versions: tuple[int, ...]
    ranks: list[list[int]]
    """``ranks[slot][slice]``."""
    a_t: dict[int, torch.Tensor]
    b_t: dict[int, list[torch.Tensor]]
    packed: dict[tuple[int, ...], Packed] = field(default_factory=dict)

    def refresh(self, a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...],
                slots: Iterable[int]) -> None:
        """Re-trim ``slots`` from vLLM's buffers; drop the packed sets that include them."""
        self.ranks = list(self.ranks)
        slots = list(slots)
        pairs = list(zip(a_stacked, b_stacked, strict=True))
        # Every slot at once (the first build): one scan per slice instead of one per slot and
        # slice. Per slot, 64 slots x 120 layers took ~5 s on our CPU before the first adapter
        # request could run (7,700 scans of a few small tensors each).
        every = (len(slots) == a_stacked[0].shape[0]
                 and [live_ranks(a, b) for a, b in pairs])
        for s in slots:
            ranks = ([per_slice[s] for per_slice in every] if every else
                     [live_ranks(a[s : s + 1], b[s : s + 1])[0] for a, b in pairs])
            self.ranks[s] = ranks
            self.a_t.pop(s, None)
            self.b_t.pop(s, None)
            self.packed = {k: v for k, v in self.packed.items() if s not in k}
            if not sum(ranks):
                continue
            self.a_t[s] = torch.cat(
                [a_stacked[i][s, 0, : ranks[i]] for i in range(len(a_stacked))], dim=0
            ).T.contiguous()
            self.b_t[s] = [b_stacked[i][s, 0, :, : ranks[i]].T.contiguous()
                           for i in range(len(b_stacked))]
        self.versions = versions_of(a_stacked, b_stacked)

    def total_rank(self, slot: int) -> int:
        return sum(self.ranks[slot])

    def packed_for(self, slots: tuple[int, ...]) -> Packed | None:
        """The concatenation of ``slots``' weights (cached per slot set), or None if all are empty."""
        found = self.packed.get(slots)
        if found is not None:
            return found
        live = [s for s in slots if self.total_rank(s)]
        if not live:
            return None
        a_cols: list[torch.Tensor] = []
        owners: list[int] = []
        slices = []
        col = 0
        for i in range(len(self.ranks[live[0]])):
            first = col
            b_rows = []
            for s in live:
                r, start = self.ranks[s][i], sum(self.ranks[s][:i])
                if r:
                    a_cols.append(self.a_t[s][:, start : start + r])
                    b_rows.append(self.b_t[s][i])
                    owners.extend([s] * r)
                    col += r
            if b_rows:
                slices.append((first, col, torch.cat(b_rows, dim=0).contiguous()))
            else:
                slices.append((first, col, None))
        ranks_key = tuple(tuple(self.ranks[s]) for s in live)
        found = Packed(
            a_t=torch.cat(a_cols, dim=1).contiguous(),
            col_slot=torch.tensor(owners, dtype=torch.long),
            slices=tuple(slices),
            key=(tuple(live), ranks_key),
        )
        if len(self.packed) >= 16:
            self.packed.clear()
        self.packed[slots] = found
        return found


_written: dict[int, set[int]] = {}
"""id(a layer's first A buffer) -> slots written since its pack was last refreshed."""


def note_slot_written(a_first: torch.Tensor, slot: int) -> None:
    _written.setdefault(id(a_first), set()).add(slot)


def versions_of(a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return tuple(t._version for t in a_stacked) + tuple(t._version for t in b_stacked)


def build_pack(a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...]) -> LayerPack:
    slots = a_stacked[0].shape[0]
    pack = LayerPack(owner=a_stacked[0], versions=(), ranks=[[0] * len(a_stacked)] * slots,
                     a_t={}, b_t={})
    pack.refresh(a_stacked, b_stacked, range(slots))
    return pack





class PackCache:
    """One :class:`LayerPack` per wrapped layer, keyed by the identity of its A buffer."""

    def __init__(self) -> None:
        self._packs: dict[int, LayerPack] = {}
        self.rebuilds = 0
        self.refreshes = 0

    def get(self, a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...]) -> LayerPack:
        key = id(a_stacked[0])
        pack = self._packs.get(key)
        if pack is not None and pack.owner is a_stacked[0]:
            if pack.versions == versions_of(a_stacked, b_stacked):
                return pack
            written = _written.pop(key, None)
            if written:
                pack.refresh(a_stacked, b_stacked, sorted(written))
                self.refreshes += 1
                if pack.versions == versions_of(a_stacked, b_stacked):
                    return pack
        _written.pop(key, None)
        pack = build_pack(a_stacked, b_stacked)
        self._packs[key] = pack
        self.rebuilds += 1
        return pack
