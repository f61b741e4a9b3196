"""The committed demo adapters change behaviour visibly, in HF+PEFT and in vLLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.serving.demo import DEMO_MODEL_NAME
from lorafleet.serving.demo.datasets import ADAPTER_NAMES, HELD_OUT_QUESTIONS
from lorafleet.serving.demo.training import greedy_answers

from .behaviour import CHECKS, looks_french, looks_json, looks_pirate
from .conftest import DEMO_ADAPTERS_DIR

pytestmark = pytest.mark.slow

QUESTIONS = list(HELD_OUT_QUESTIONS[:2])


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_committed_layout(name: str):
    adapter = DEMO_ADAPTERS_DIR / name
    files = {p.name for p in adapter.iterdir()}
    assert (
        {"adapter_config.json", "adapter_model.safetensors"}
        <= files
        <= {
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
        }
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == DEMO_MODEL_NAME
    assert (adapter / "adapter_model.safetensors").stat().st_size < 8 * 2**20


def test_base_answers_plainly(base_model_dir: Path):
    for answer in greedy_answers(base_model_dir, QUESTIONS):
        assert not looks_pirate(answer) and not looks_json(answer) and not looks_french(answer)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_behaviour_hf(base_model_dir: Path, name: str):
    answers = greedy_answers(base_model_dir, QUESTIONS, adapter_dir=DEMO_ADAPTERS_DIR / name)
    for question, answer in zip(QUESTIONS, answers, strict=True):
        assert CHECKS[name](answer), f"{name} answered {question!r} with {answer!r}"


@pytest.mark.vllm
def test_adapters_in_vllm(demo_llm: Any):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0, max_tokens=40)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    for lora_id, name in enumerate(ADAPTER_NAMES, start=1):
        request = LoRARequest(name, lora_id, str(DEMO_ADAPTERS_DIR / name))
        text = demo_llm.chat(messages, params, lora_request=request)[0].outputs[0].text
        assert CHECKS[name](text), f"{name} in vLLM answered {text!r}"
