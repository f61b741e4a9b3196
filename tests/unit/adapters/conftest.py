"""Shared fixtures: a tiny Llama base model and a builder of small PEFT LoRA adapters on disk."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorafleet.adapters.basemodel import BaseModelInfo, base_model_info_from_config, block_of
from lorafleet.adapters.validation import ValidationLimits

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
}


@pytest.fixture
def tiny_base() -> BaseModelInfo:
    return base_model_info_from_config(TINY_CONFIG, "tiny-llama")


@pytest.fixture
def limits() -> ValidationLimits:
    return ValidationLimits(max_rank=16, max_bytes=4 << 20)


AdapterBuilder = Callable[..., Path]


@pytest.fixture
def make_adapter(tmp_path: Path, tiny_base: BaseModelInfo) -> AdapterBuilder:
    """Write a valid adapter (seeded weights); keyword overrides make hostile variants."""
    counter = iter(range(1_000_000))

    def build(
        path: Path | None = None,
        *,
        rank: int = 4,
        targets: Sequence[str] = ("q_proj", "v_proj"),
        layers: int = 4,
        dtype: Any = np.float16,
        config: dict[str, Any] | None = None,
        tensors: Callable[[dict[str, np.ndarray]], None] | None = None,
    ) -> Path:
        path = path or tmp_path / f"adapter{next(counter)}"
        path.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "peft_type": "LORA",
            "base_model_name_or_path": "tiny-llama",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(targets),
            "bias": "none",
            "modules_to_save": None,
            "task_type": "CAUSAL_LM",
        }
        cfg.update(config or {})
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        rng = np.random.default_rng(0)
        weights: dict[str, np.ndarray] = {}
        for layer in range(layers):
            for module in targets:
                in_f, out_f = tiny_base.modules[module]
                prefix = f"base_model.model.model.layers.{layer}.{block_of(module)}.{module}"
                weights[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, in_f)).astype(dtype)
                weights[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, rank)).astype(dtype)
        if tensors is not None:
            tensors(weights)
        save_file(weights, str(path / "adapter_model.safetensors"))
        return path

    return build
