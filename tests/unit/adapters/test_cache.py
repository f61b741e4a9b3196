from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorafleet.adapters.cache import AdapterCache, CacheEntry, decide_evictions
from lorafleet.adapters.errors import CacheError


def _digest(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _src(tmp_path: Path, i: int, size: int = 1000) -> Path:
    src = tmp_path / f"src{i}"
    src.mkdir(exist_ok=True)
    (src / "adapter_model.safetensors").write_bytes(bytes([i % 256]) * size)
    return src


def test_put_get_round_trip(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path / "cache", max_bytes=10_000)
    path = cache.put(_src(tmp_path, 1), _digest(1))
    assert cache.get(_digest(1)) == path
    assert (path / "adapter_model.safetensors").read_bytes() == b"\x01" * 1000
    assert cache.put(_src(tmp_path, 1), _digest(1)) == path  # idempotent
    assert cache.get(_digest(2)) is None
    assert not list((tmp_path / "cache" / ".staging").iterdir())


def test_lru_eviction_keeps_recently_used(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path / "cache", max_bytes=2500)
    for i in range(2):
        cache.put(_src(tmp_path, i), _digest(i))
    cache.touch(_digest(0), 100.0)
    cache.touch(_digest(1), 50.0)  # 1 is the least recently used
    cache.put(_src(tmp_path, 2), _digest(2))
    assert _digest(1) not in cache
    assert _digest(0) in cache and _digest(2) in cache
    assert cache.total_bytes() <= 2500


def test_pinned_entry_is_never_evicted(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path / "cache", max_bytes=1500)
    cache.put(_src(tmp_path, 0), _digest(0))
    cache.touch(_digest(0), 1.0)
    with cache.pinned(_digest(0)) as path:
        cache.put(_src(tmp_path, 1), _digest(1))
        assert (path / "adapter_model.safetensors").exists()  # over budget, but in use
        assert cache.remove(_digest(0)) is False
    assert cache.evict() == [_digest(0)]
    assert _digest(0) not in cache and _digest(1) in cache


def test_pins_are_visible_to_another_cache_object(tmp_path: Path) -> None:
    # Two AdapterCache objects over one root stand in for two processes.
    a = AdapterCache(tmp_path / "cache", max_bytes=500)
    b = AdapterCache(tmp_path / "cache", max_bytes=500)
    a.put(_src(tmp_path, 0), _digest(0))
    a.pin(_digest(0))
    assert b.evict() == []
    a.unpin(_digest(0))
    assert b.evict() == [_digest(0)]


def test_unpin_without_pin_and_bad_digest(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path / "cache", max_bytes=500)
    with pytest.raises(CacheError):
        cache.unpin(_digest(0))
    with pytest.raises(CacheError):
        cache.get("../../etc")


@given(
    st.lists(st.tuples(st.integers(0, 5000), st.floats(0, 1e6)), max_size=12),
    st.integers(0, 20_000),
    st.sets(st.integers(0, 11)),
)
def test_decide_evictions_invariants(items: list[tuple[int, float]], max_bytes: int,
                                     pinned_idx: set[int]) -> None:
    entries = [CacheEntry(_digest(i), size, t) for i, (size, t) in enumerate(items)]
    pinned = frozenset(_digest(i) for i in pinned_idx)
    victims = decide_evictions(entries, max_bytes, pinned)
    assert not set(victims) & pinned
    remaining = [e for e in entries if e.digest not in victims]
    total = sum(e.size_bytes for e in remaining)
    unpinned_left = [e for e in remaining if e.digest not in pinned]
    # Either it fits, or everything evictable is gone.
    assert total <= max_bytes or not unpinned_left
    # Nothing evicted is more recent than something unpinned that stayed.
    if victims and unpinned_left:
        newest_victim = max(e.last_used for e in entries if e.digest in victims)
        assert newest_victim <= min(e.last_used for e in unpinned_left)


# --- registered copies: pinned while in use, kept while nothing else could bring them back ---


@given(
    sizes=st.lists(st.integers(1, 500), min_size=1, max_size=12),
    budget=st.integers(0, 3000),
    pinned_mask=st.integers(0, 2**12 - 1),
    kept_mask=st.integers(0, 2**12 - 1),
)
def test_evictions_never_choose_pinned_or_kept_entries(
    sizes: list[int], budget: int, pinned_mask: int, kept_mask: int
) -> None:
    entries = [CacheEntry(_digest(i), s, float(i)) for i, s in enumerate(sizes)]
    pinned = frozenset(_digest(i) for i in range(len(sizes)) if pinned_mask >> i & 1)
    kept = frozenset(_digest(i) for i in range(len(sizes)) if kept_mask >> i & 1)
    victims = decide_evictions(entries, budget, pinned, kept)
    assert not set(victims) & (pinned | kept)
    # Least recently used first: every victim is older than every evictable survivor.
    evictable_left = [e for e in entries if e.digest not in pinned | kept | set(victims)]
    if victims and evictable_left:
        newest_victim = max(e.last_used for e in entries if e.digest in victims)
        assert newest_victim < min(e.last_used for e in evictable_left)


def test_a_kept_copy_survives_eviction_even_over_budget(tmp_path: Path) -> None:
    """The only copy of a registered adapter (no store, a source no other node can read) is
    never deleted to make room: the cache stays over budget instead."""
    cache = AdapterCache(tmp_path / "cache", max_bytes=1500)
    cache.put(_src(tmp_path, 0), _digest(0), keep=True)
    cache.touch(_digest(0), 1.0)  # the oldest
    cache.put(_src(tmp_path, 1), _digest(1))
    cache.put(_src(tmp_path, 2), _digest(2))
    assert _digest(0) in cache
    assert _digest(0) in cache.kept_digests()
    assert _digest(1) not in cache  # the evictable LRU one went instead
    cache.unkeep(_digest(0))  # e.g. it reached the shared store
    cache.touch(_digest(0), 1.0)
    cache.put(_src(tmp_path, 3), _digest(3))
    assert _digest(0) not in cache

