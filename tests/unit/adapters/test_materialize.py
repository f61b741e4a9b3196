"""A node that lacks an adapter's files fetches them by digest: store first, then the source;
verified, validated, cached, pinned while used; one fetch per digest however many ask."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from lorafleet.adapters.basemodel import BaseModelInfo
from lorafleet.adapters.cache import AdapterCache
from lorafleet.adapters.errors import AdapterFetchError
from lorafleet.adapters.materialize import Materializer, decide_origins, decide_refetchable
from lorafleet.adapters.model import AdapterContent
from lorafleet.adapters.store import FileStore
from lorafleet.adapters.validation import ValidationLimits, validate_adapter_dir

from .conftest import AdapterBuilder

D = "ab" * 32


def test_origins_store_first_then_the_records_copy_then_the_source() -> None:
    content = AdapterContent(D, "s3://src/a", "creds", f"s3://other/x/{D}")
    assert decide_origins(content, "s3://store/p") == (
        ("store", "s3://store/p"), ("stored_at", f"s3://other/x/{D}"), ("source", "s3://src/a"))
    # The record's copy is the store's own: not asked twice.
    assert decide_origins(AdapterContent(D, "/x", stored_at=f"s3://store/p/{D}"), "s3://store/p") \
        == (("store", "s3://store/p"), ("source", "/x"))
    assert decide_origins(AdapterContent(D, "/x"), None) == (("source", "/x"),)


@pytest.mark.parametrize(("content", "refetchable"), [
    (AdapterContent(D, "/data/upload/a"), False),  # this node's disk only
    (AdapterContent(D, "file:///data/a"), False),
    (AdapterContent(D, "hf://org/a"), False),  # the local HF cache: offline
    (AdapterContent(D, "s3://bucket/a"), True),
    (AdapterContent(D, "https://example.com/a.tar.gz"), True),
    (AdapterContent(D, "/data/upload/a", stored_at=f"file:///shared/{D}"), True),
])
def test_refetchable(content: AdapterContent, refetchable: bool) -> None:
    assert decide_refetchable(content) is refetchable


class CountingStore(FileStore):
    """The real file store, counting fetches (and able to hold them back)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fetches = 0
        self.gate = threading.Event()
        self.gate.set()

    def fetch(self, digest: str, dest: Path, *, max_bytes: int) -> Path:
        self.fetches += 1
        self.gate.wait(10)
        return super().fetch(digest, dest, max_bytes=max_bytes)


@pytest.fixture
def node(tmp_path: Path, tiny_base: BaseModelInfo, limits: ValidationLimits):
    """Build a Materializer for a fresh node (its own data dir) sharing one store."""
    store = CountingStore(tmp_path / "shared-store")
    count = iter(range(100))

    def build(cache_bytes: int = 1 << 30, with_store: bool = True) -> Materializer:
        data = tmp_path / f"node{next(count)}"
        return Materializer(AdapterCache(data / "adapter-cache", cache_bytes), base=tiny_base,
                            limits=limits, work_dir=data / "tmp",
                            store=store if with_store else None)

    build.store = store  # type: ignore[attr-defined]
    return build


def _stored(make_adapter: AdapterBuilder, store: FileStore, tiny_base: BaseModelInfo,
            limits: ValidationLimits, **kw: object) -> AdapterContent:
    src = make_adapter(**kw)
    manifest = validate_adapter_dir(src, tiny_base, limits)
    stored_at = store.put(src, manifest.digest, manifest.files)
    return AdapterContent(manifest.digest, str(src), None, stored_at, manifest.size_bytes)


async def test_a_node_without_the_files_fetches_them_from_the_store(
        node, make_adapter: AdapterBuilder, tiny_base: BaseModelInfo,
        limits: ValidationLimits) -> None:
    content = _stored(make_adapter, node.store, tiny_base, limits)
    shutil.rmtree(content.source)  # the importing pod (and its upload) is gone
    path = await node().acquire(content)
    assert path.name == content.digest
    assert validate_adapter_dir(path, tiny_base, limits).digest == content.digest
    assert node.store.fetches == 1


async def test_a_tampered_store_copy_is_refused_and_the_source_used(
        node, make_adapter: AdapterBuilder, tiny_base: BaseModelInfo,
        limits: ValidationLimits) -> None:
    content = _stored(make_adapter, node.store, tiny_base, limits)
    weights = node.store.root / content.digest / "adapter_model.safetensors"
    other = make_adapter(rank=2)  # valid, but other bytes than the digest names
    weights.write_bytes((other / "adapter_model.safetensors").read_bytes())
    (node.store.root / content.digest / "adapter_config.json").write_bytes(
        (other / "adapter_config.json").read_bytes())
    path = await node().materialize(content)
    assert validate_adapter_dir(path, tiny_base, limits).digest == content.digest


async def test_concurrent_requests_for_one_missing_adapter_fetch_it_once(
        node, make_adapter: AdapterBuilder, tiny_base: BaseModelInfo,
        limits: ValidationLimits) -> None:
    content = _stored(make_adapter, node.store, tiny_base, limits)
    m = node()
    node.store.gate.clear()  # hold the first fetch until every caller is waiting
    waiters = [asyncio.create_task(m.acquire(content)) for _ in range(8)]
    await asyncio.sleep(0.2)
    node.store.gate.set()
    paths = await asyncio.gather(*waiters)
    assert len(set(paths)) == 1
    assert node.store.fetches == 1
    for _ in paths:
        m.release(content.digest)


async def test_one_caller_giving_up_does_not_cancel_the_others_fetch(
        node, make_adapter: AdapterBuilder, tiny_base: BaseModelInfo,
        limits: ValidationLimits) -> None:
    content = _stored(make_adapter, node.store, tiny_base, limits)
    m = node()
    node.store.gate.clear()
    first = asyncio.create_task(m.materialize(content))
    second = asyncio.create_task(m.materialize(content))
    await asyncio.sleep(0.1)
    first.cancel()
    node.store.gate.set()
    assert (await second).name == content.digest
    assert node.store.fetches == 1


async def test_files_in_use_are_never_evicted_and_every_adapter_still_materializes(
        node, make_adapter: AdapterBuilder, tiny_base: BaseModelInfo,
        limits: ValidationLimits) -> None:
    contents = [_stored(make_adapter, node.store, tiny_base, limits, rank=r) for r in (2, 4, 6, 8)]
    one = contents[0].size_bytes
    m = node(cache_bytes=int(one * 1.5))  # room for about one adapter
    held = await m.acquire(contents[0])  # loaded in the engine: pinned
    for c in contents[1:]:
        assert (await m.materialize(c)).is_dir()
        assert held.is_dir()  # never evicted while in use
    m.release(contents[0].digest)
    for c in contents:  # more adapters than the cache holds: each still comes back
        assert validate_adapter_dir(await m.materialize(c), tiny_base, limits).digest == c.digest


async def test_without_a_store_the_only_copy_is_kept(
        node, make_adapter: AdapterBuilder, tiny_base: BaseModelInfo,
        limits: ValidationLimits) -> None:
    srcs = [make_adapter(rank=r) for r in (2, 4)]
    contents = [AdapterContent(validate_adapter_dir(s, tiny_base, limits).digest, str(s))
                for s in srcs]
    m = node(cache_bytes=1, with_store=False)
    for c in contents:
        await m.materialize(c)
    for s in srcs:
        shutil.rmtree(s)  # the local sources are gone: the cache holds the only copies
    for c in contents:
        assert (await m.materialize(c)).is_dir()


async def test_a_failed_fetch_is_one_short_error_and_leaves_nothing(
        node, tmp_path: Path) -> None:
    m = node()
    with pytest.raises(AdapterFetchError) as info:
        await m.materialize(AdapterContent(D, str(tmp_path / "gone")))
    assert not info.value.transient
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert "store:" in str(info.value) and "source:" in str(info.value)
    assert m.cache.entries() == []
    assert not list(m.work_dir.iterdir())
