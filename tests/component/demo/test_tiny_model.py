"""make_tiny_model is reproducible and idempotent; a random adapter changes its greedy output."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.serving.demo import TINY_MODEL_NAME, make_random_adapter, make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / TINY_MODEL_NAME, seed=0)


def test_reproducible_and_idempotent(tiny_dir: Path, tmp_path: Path):
    again = make_tiny_model(tmp_path / TINY_MODEL_NAME, seed=0)
    first, second = (load_file(str(d / "model.safetensors")) for d in (tiny_dir, again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(t.dtype == torch.float32 for t in first.values())
    started = time.monotonic()
    assert make_tiny_model(tiny_dir, seed=0) == tiny_dir
    assert time.monotonic() - started < 1.0


def test_random_adapter_changes_greedy_output(tiny_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_random_adapter(
        tiny_dir,
        tmp_path / "adapter",
        rank=8,
        target_modules=["q_proj", "v_proj"],
        seed=0,
        base_model_name=TINY_MODEL_NAME,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    base = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    tuned = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert not torch.equal(base, tuned)
