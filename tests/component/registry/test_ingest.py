"""import_adapter end to end: a real directory, the real cache and each registry backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorafleet.adapters.basemodel import base_model_info_from_config, block_of
from lorafleet.adapters.cache import AdapterCache
from lorafleet.adapters.errors import AdapterValidationError, NotFound
from lorafleet.adapters.ingest import import_adapter
from lorafleet.adapters.model import Quota, Tenant
from lorafleet.adapters.registry import Registry
from lorafleet.adapters.validation import ValidationLimits

BASE = base_model_info_from_config(
    {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
     "num_key_value_heads": 2, "num_hidden_layers": 4}, "tiny-llama")


def write_adapter(path: Path, *, base_name: str = "tiny-llama", rank: int = 4) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": base_name, "r": rank,
        "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    rng = np.random.default_rng(1)
    weights = {}
    for layer in range(BASE.num_layers):
        for module in ("q_proj", "v_proj"):
            in_f, out_f = BASE.modules[module]
            prefix = f"base_model.model.model.layers.{layer}.{block_of(module)}.{module}"
            weights[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, in_f), np.float32)
            weights[f"{prefix}.lora_B.weight"] = np.zeros((out_f, rank), np.float32)
    save_file(weights, str(path / "adapter_model.safetensors"))
    return path


async def test_import_registers_a_cached_adapter(registry: Registry, tmp_path: Path) -> None:
    await registry.put_tenant(Tenant("alice", "Alice", Quota(), 1.0))
    cache = AdapterCache(tmp_path / "cache", max_bytes=1 << 24)
    src = write_adapter(tmp_path / "src")
    record = await import_adapter(
        tenant="alice", name="sql", source=src.as_uri(), shared=True, registry=registry,
        cache=cache, base=BASE, limits=ValidationLimits(), work_dir=tmp_path / "work",
        clock=lambda: 42.0)
    assert record.adapter_id == f"alice/sql@{record.digest[:12]}"
    assert (record.rank, record.alpha, record.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert (cache.get(record.digest) / "adapter_model.safetensors").is_file()
    assert record.stored_at is None  # no shared store configured
    assert record.digest in cache.kept_digests()  # a local source: the cache copy is the only one
    assert await registry.get_adapter("alice", "sql") == record
    assert not list((tmp_path / "work").iterdir())  # scratch space cleaned


async def test_refused_adapter_leaves_no_trace(registry: Registry, tmp_path: Path) -> None:
    await registry.put_tenant(Tenant("alice", "Alice", Quota(), 1.0))
    generation = await registry.generation()
    cache = AdapterCache(tmp_path / "cache", max_bytes=1 << 24)
    src = write_adapter(tmp_path / "src", base_name="other-model")
    with pytest.raises(AdapterValidationError) as info:
        await import_adapter(
            tenant="alice", name="sql", source=str(src), shared=False, registry=registry,
            cache=cache, base=BASE, limits=ValidationLimits(), work_dir=tmp_path / "work")
    assert info.value.code == "wrong_base_model"
    assert await registry.generation() == generation
    assert cache.entries() == []
    with pytest.raises(NotFound):
        await import_adapter(
            tenant="nobody", name="sql", source=str(src), shared=False, registry=registry,
            cache=cache, base=BASE, limits=ValidationLimits(), work_dir=tmp_path / "work")
