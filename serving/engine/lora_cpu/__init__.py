"""vLLM plugin: LoRAFleet's CPU LoRA ops (the ``-1`` index fix, grouped matmuls).

vLLM calls every ``vllm.general_plugins`` entry point in every process it starts
(API server, engine core, workers), so ``register`` runs before any model is built.
It swaps the op functions that ``PunicaWrapperCPU`` calls for the ones in ``ops``.
The swap is a no-op off the CPU path: the CUDA wrapper uses Triton kernels, not these.

Set ``LORAFLEET_STOCK_LORA_OPS=1`` to keep vLLM's own ops (used by the regression test
that shows the bug, and for A/B measurements).
"""

from __future__ import annotations

import os

from . import ops

_PATCHED_NAMES = ops.__all__


def register() -> None:
    """Install the fixed ops into vLLM's torch-ops module and the CPU Punica wrapper."""
    if os.environ.get("LORAFLEET_STOCK_LORA_OPS", "") in ("1", "true", "True"):
        return
    import vllm.lora.ops.torch_ops as torch_ops_pkg
    import vllm.lora.ops.torch_ops.lora_ops as lora_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for module in (lora_ops, torch_ops_pkg, punica_cpu):
        for name in _PATCHED_NAMES:
            if hasattr(module, name):
                setattr(module, name, getattr(ops, name))


def is_registered() -> bool:
    """True when vLLM's CPU Punica wrapper calls our ops."""
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    return punica_cpu.bgmv_shrink is ops.bgmv_shrink
