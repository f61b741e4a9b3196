"""KV tiers: bounded bytes, LRU eviction, spill to disk, promotion, misses fall back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.serving.kvcache import DiskTier, HostPool, TieredStore


def test_host_pool_evicts_least_recently_used_within_its_bytes():
    pool = HostPool(capacity_bytes=10)
    assert pool.put("a", b"1234") == []
    assert pool.put("b", b"1234") == []
    assert pool.get("a") == b"1234"  # a is now the most recent
    evicted = pool.put("c", b"1234")
    assert evicted == [("b", b"1234")]
    assert "b" not in pool and pool.used_bytes == 8
    assert pool.get("b") is None and pool.stats.misses == 1
    assert pool.put("huge", b"x" * 11) == [("huge", b"x" * 11)]  # never stored
    assert "huge" not in pool


def test_tiered_store_spills_to_disk_and_promotes_back(tmp_path):
    store = TieredStore(HostPool(8), DiskTier(tmp_path, capacity_bytes=8))
    store.put("a", b"aaaa")
    store.put("b", b"bbbb")
    store.put("c", b"cccc")  # a spills to disk
    assert "a" not in store.host and "a" in store.disk and "a" in store
    assert store.get("a") == b"aaaa"  # promoted; b spills
    assert "a" in store.host and "b" in store.disk
    store.put("d", b"dddd")
    store.put("e", b"eeee")  # disk is full too: the oldest on disk is gone for good
    assert store.get("b") is None or store.get("b") == b"bbbb"
    assert store.host.used_bytes <= 8 and store.disk.used_bytes <= 8


def test_disk_file_removed_behind_our_back_is_a_miss(tmp_path):
    disk = DiskTier(tmp_path, 100)
    disk.put("k", b"v")
    for f in tmp_path.iterdir():
        f.unlink()
    assert disk.get("k") is None and "k" not in disk and disk.used_bytes == 0


def test_matched_prefix_stops_at_the_first_missing_block():
    store = TieredStore(HostPool(100))
    for k in ("h0", "h1", "h3"):
        store.put(k, b"x")
    assert store.matched_prefix(["h0", "h1", "h2", "h3"]) == 2
    assert store.matched_prefix(["z"]) == 0


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 12)), max_size=60),
       st.integers(0, 30))
@settings(max_examples=200, deadline=None)
def test_host_pool_never_exceeds_capacity_and_returns_what_it_kept(ops, cap):
    pool = HostPool(cap)
    model: dict[str, bytes] = {}
    for key, size in ops:
        data = key.encode() * size
        for k, _ in pool.put(key, data):
            model.pop(k, None)
        if len(data) <= cap:
            model[key] = data
        assert pool.used_bytes <= cap
        assert pool.used_bytes == sum(len(v) for v in model.values())
    for k, v in model.items():
        assert pool.get(k) == v
