"""prepare_base_model: idempotent, complete, and vLLM answers sensibly with it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from lorafleet.serving.demo import is_prepared, prepare_base_model

pytestmark = pytest.mark.slow


def test_prepare_is_idempotent_and_complete(base_model_dir: Path):
    assert is_prepared(base_model_dir)
    started = time.monotonic()
    assert prepare_base_model(base_model_dir, progress=False) == base_model_dir
    assert time.monotonic() - started < 1.0
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (base_model_dir / name).is_file(), name
    config = json.loads((base_model_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.vllm
def test_vllm_answers_capital_of_france(demo_llm: Any):
    from vllm import SamplingParams

    out = demo_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=24),
    )
    assert "Paris" in out[0].outputs[0].text
