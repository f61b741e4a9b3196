"""Fixtures for the demo component tests: where the prepared SmolLM2 model lives."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(autouse=True)
def _vllm_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    # In-process engine, no hub, caches inside the data dir (see ENVIRONMENT.md).
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(data_dir / "vllm-cache"))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
