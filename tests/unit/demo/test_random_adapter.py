"""make_random_adapter writes exactly the PEFT layout, with the shapes of the base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.serving.demo import DEMO_MODEL_NAME, TINY_MODEL_NAME, make_random_adapter
from lorafleet.serving.demo.basemodel import _TINY_ARCH

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def tiny_config_dir(tmp_path: Path) -> Path:
    """A tiny-llama ``config.json`` (the builder reads nothing else), small vocab for speed."""
    config = {"model_type": "llama", "vocab_size": 512, **_TINY_ARCH}
    base = tmp_path / TINY_MODEL_NAME
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    return base


def _peft_reference(base: Path, rank: int, targets: list[str]) -> dict[str, torch.Size]:
    """Names and shapes PEFT itself would save for this base, rank and targets."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**json.loads((base / "config.json").read_text()))
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=rank, target_modules=targets, task_type="CAUSAL_LM")
    )
    return {k: v.shape for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize(
    ("rank", "targets"), [(8, ["q_proj", "v_proj"]), (4, TARGETS), (16, ["o_proj", "down_proj"])]
)
def test_layout_matches_peft(tiny_config_dir: Path, tmp_path: Path, rank: int, targets: list[str]):
    out = make_random_adapter(
        tiny_config_dir,
        tmp_path / "adapter",
        rank=rank,
        target_modules=targets,
        seed=1,
        base_model_name=TINY_MODEL_NAME,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == _peft_reference(tiny_config_dir, rank, targets)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TINY_MODEL_NAME
    assert config["peft_type"] == "LORA"
    assert config["r"] == rank
    assert config["lora_alpha"] == rank  # alpha defaults to rank
    assert sorted(config["target_modules"]) == sorted(targets)


def test_weights_are_nonzero_and_seeded(tiny_config_dir: Path, tmp_path: Path):
    kwargs = {"rank": 8, "target_modules": ["q_proj"], "base_model_name": DEMO_MODEL_NAME}
    a = make_random_adapter(tiny_config_dir, tmp_path / "a", seed=3, **kwargs)
    b = make_random_adapter(tiny_config_dir, tmp_path / "b", seed=3, **kwargs)
    c = make_random_adapter(tiny_config_dir, tmp_path / "c", seed=4, **kwargs)
    ta, tb, tc = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b, c))
    for key, value in ta.items():
        assert value.abs().sum() > 0, key  # B too: PEFT zeroes it, we must not
        assert torch.equal(value, tb[key])
        assert not torch.equal(value, tc[key])


def test_alpha_is_written(tiny_config_dir: Path, tmp_path: Path):
    out = make_random_adapter(
        tiny_config_dir,
        tmp_path / "a",
        rank=4,
        alpha=32,
        target_modules=["v_proj"],
        seed=0,
        base_model_name=DEMO_MODEL_NAME,
    )
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 32


@pytest.mark.parametrize(("rank", "targets"), [(4, ["nope"]), (0, ["q_proj"])],
                         ids=["unknown-module", "rank-0"])
def test_invalid_adapter_is_refused(tiny_config_dir: Path, tmp_path: Path, rank: int,
                                    targets: list[str]):
    with pytest.raises(ValueError):
        make_random_adapter(tiny_config_dir, tmp_path / "b", rank=rank, target_modules=targets,
                            seed=0, base_model_name=DEMO_MODEL_NAME)
