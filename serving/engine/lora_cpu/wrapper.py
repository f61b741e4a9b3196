"""LoRAFleet's Punica wrapper for vLLM's CPU backend (installed by the plugin in ``__init__``).

It is vLLM's ``PunicaWrapperCPU`` with the hot calls replaced: ``add_lora_linear`` (every
LoRA-wrapped linear layer: qkv, o, gate_up, down) and ``add_lora_logits`` (vLLM wraps the
LM head of every LoRA-enabled model, whether or not an adapter targets it) go through a
per-step plan (``plan``), rank-trimmed cached weights (``packing``: an adapter that does not
target a layer costs nothing there) and the grouped/packed GEMMs (``compute``). The rest
(embeddings, the sharded shrink/expand pair, full-linear classifiers) stays on the stock code
paths, which call the index-safe ops of ``ops`` once the plugin has patched them.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from .compute import apply_lora_linear
from .packing import PackCache
from .plan import StepPlan, build_plan


class PunicaWrapperFleetCPU(PunicaWrapperCPU):
    def __init__(self, max_num_batched_tokens: int, max_batches: int,
                 device: torch.device | str, **kwargs: Any) -> None:
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self.packs = PackCache()
        self.plan: StepPlan = build_plan(torch.empty(0, dtype=torch.long))
        self.sampler_plan: StepPlan = self.plan

    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], max_loras: int,
                        vocab_size: int, **kwargs: Any) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self.plan = build_plan(self.token_lora_indices)
        self.sampler_plan = build_plan(self.sampler_indices)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor,
                        lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                        output_slices: tuple[int, ...], *, buffer: Any = None,
                        **kwargs: Any) -> None:
        x2 = x.view(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if x2.shape[0] != self.plan.n:  # not the mapped batch (never seen): stock semantics
            super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                    buffer=buffer, **kwargs)
            return
        if not self.plan.groups:
            return
        pack = self.packs.get(lora_a_stacked, lora_b_stacked)
        apply_lora_linear(y2, x2, pack, self.plan, scale, output_slices)

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale: float, *, buffer: Any = None,
                        **kwargs: Any) -> None:
        x2 = x.view(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if x2.shape[0] != self.sampler_plan.n or lora_b_stacked.shape[2] != y2.shape[1]:
            super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer,
                                    **kwargs)
            return
        if not self.sampler_plan.groups:
            return
        pack = self.packs.get((lora_a_stacked,), (lora_b_stacked,))
        apply_lora_linear(y2, x2, pack, self.sampler_plan, scale, (y2.shape[1],))
