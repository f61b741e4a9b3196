"""The shape of the served base model, as adapter validation needs it.

Boundary: `base_model_info_from_config` is pure over a HF `config.json` dict (Llama family);
`load_base_model_info` reads the file. No weights are loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "LLAMA_MODULES",
    "BaseModelInfo",
    "base_model_info_from_config",
    "block_of",
    "load_base_model_info",
]

LLAMA_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
_ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


def block_of(module: str) -> Literal["self_attn", "mlp"]:
    """Which block of a Llama decoder layer holds `module`."""
    return "self_attn" if module in _ATTENTION else "mlp"


@dataclass(frozen=True, slots=True)
class BaseModelInfo:
    """`modules` maps a projection name to its `(in_features, out_features)`."""

    name: str
    num_layers: int
    modules: Mapping[str, tuple[int, int]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))


def base_model_info_from_config(config: Mapping[str, Any], served_name: str) -> BaseModelInfo:
    """Compute projection shapes from a Llama-family `config.json`."""
    try:
        hidden = int(config["hidden_size"])
        inter = int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        layers = int(config["num_hidden_layers"])
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a Llama-family config.json: {exc!r}") from exc
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    modules = {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return BaseModelInfo(name=served_name, num_layers=layers, modules=modules)


def load_base_model_info(model_dir: Path | str, served_name: str) -> BaseModelInfo:
    """Read `<model_dir>/config.json`."""
    with (Path(model_dir) / "config.json").open(encoding="utf-8") as f:
        return base_model_info_from_config(json.load(f), served_name)
