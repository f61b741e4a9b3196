"""import_adapter end to end: a real directory, the real cache and each registry backend."""

from __future__ import annotations

from pathlib import Path

import pytest
from adapterfiles import TINY_LLAMA_CONFIG
from adapterfiles import write_tiny_adapter as write_adapter

from lorafleet.adapters.basemodel import base_model_info_from_config
from lorafleet.adapters.cache import AdapterCache
from lorafleet.adapters.errors import AdapterValidationError, NotFound
from lorafleet.adapters.ingest import import_adapter
from lorafleet.adapters.model import Quota, Tenant
from lorafleet.adapters.registry import Registry
from lorafleet.adapters.validation import ValidationLimits

BASE = base_model_info_from_config(TINY_LLAMA_CONFIG, "tiny-llama")


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
    src = write_adapter(tmp_path / "src", base="other-model")
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
