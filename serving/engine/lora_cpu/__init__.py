"""vLLM plugin: LoRAFleet's CPU LoRA path (index-safe ops, grouped/packed multi-LoRA GEMMs).

vLLM calls every ``vllm.general_plugins`` entry point in every process it starts
(API server, engine core, workers), so ``register`` runs before any model is built. It

* points ``CpuPlatform.get_punica_wrapper()`` at :class:`wrapper.PunicaWrapperFleetCPU`
  (per-step plan, rank-trimmed weights, grouped GEMMs for prefill, packed GEMMs for decode);
* swaps the op functions the stock wrapper still uses (embeddings, logits, sharded layers)
  for the index-safe ones in ``ops`` (a ``-1`` row never picks up the last slot);
* wraps the linear and LM-head layers' ``reset_lora`` (the first step of every slot write)
  to note which slot changed, so the wrapper re-trims just that slot (``packing``).

Nothing changes off the CPU path: the CUDA platform names its own (Triton) wrapper.
Set ``LORAFLEET_STOCK_LORA_OPS=1`` to keep vLLM's own wrapper and ops, bug included
(the regression test that shows the bug, and A/B measurements).

Design and figures: docs/lora-cpu.md.
"""

from __future__ import annotations

import os
from typing import Any

from . import ops

_PATCHED_NAMES = ops.__all__
WRAPPER_QUALNAME = "lorafleet.serving.engine.lora_cpu.wrapper.PunicaWrapperFleetCPU"


def stock_requested() -> bool:
    return os.environ.get("LORAFLEET_STOCK_LORA_OPS", "") in ("1", "true", "True")


def register() -> None:
    """Install our wrapper and the fixed ops into vLLM (idempotent)."""
    if stock_requested():
        return
    import vllm.lora.ops.torch_ops as torch_ops_pkg
    import vllm.lora.ops.torch_ops.lora_ops as lora_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    from vllm.platforms.cpu import CpuPlatform

    for module in (lora_ops, torch_ops_pkg, punica_cpu):
        for name in _PATCHED_NAMES:
            if hasattr(module, name):
                setattr(module, name, getattr(ops, name))
    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)
    _note_slot_writes()


def _note_slot_writes() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    from .packing import note_slot_written

    for cls in (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA):
        original = cls.reset_lora
        if getattr(original, "_lorafleet", False):
            continue

        def reset_lora(self: Any, index: int, _original: Any = original) -> None:
            _original(self, index)
            a = self.lora_a_stacked
            note_slot_written(a[0] if isinstance(a, tuple) else a, index)

        reset_lora._lorafleet = True  # type: ignore[attr-defined]
        cls.reset_lora = reset_lora  # type: ignore[method-assign]


def is_registered() -> bool:
    """True when vLLM's CPU platform uses our wrapper and ops."""
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    from vllm.platforms.cpu import CpuPlatform

    return (punica_cpu.bgmv_shrink is ops.bgmv_shrink
            and CpuPlatform.get_punica_wrapper() == WRAPPER_QUALNAME)
