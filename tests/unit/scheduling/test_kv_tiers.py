"""KV tiers: folders bounded by bytes, LRU eviction, spill to disk, claims that outlive
eviction, and a second process's view (exists/claim) of what the writer stored."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.serving.kvcache import FileTier, TieredStore


def test_file_tier_evicts_the_oldest_within_its_bytes(tmp_path):
    tier = FileTier(tmp_path / "host", capacity_bytes=10)
    assert tier.put("a", b"1234") and tier.put("b", b"1234")
    assert tier.put("c", b"1234")  # a is the oldest: evicted
    assert "a" not in tier and not tier.exists("a") and tier.exists("b")
    assert tier.used_bytes == 8 and tier.stats.evicted_blocks == 1
    assert not tier.put("huge", b"x" * 11) and not tier.exists("huge")  # never stored


def test_a_second_view_of_the_folder_sees_and_claims_what_the_writer_stored(tmp_path):
    writer = FileTier(tmp_path / "host", capacity_bytes=8)
    reader = FileTier(tmp_path / "host", capacity_bytes=8)  # another process's instance
    writer.put("k", b"kkkk")
    assert reader.exists("k") and "k" not in reader  # no accounting on the reader's side
    claim = reader.claim("k", "r1")
    assert claim is not None and claim.read_bytes() == b"kkkk"
    writer.put("k", b"KKKK")  # rewritten after the claim: the claim keeps the old bytes
    writer.put("x", b"xxxx")
    writer.put("y", b"yyyy")  # ... and evicted
    assert not reader.exists("k") and claim.read_bytes() == b"kkkk"
    assert reader.claim("k", "r2") is None


def test_tiered_store_spills_to_disk_and_claims_from_either_tier(tmp_path):
    store = TieredStore(FileTier(tmp_path / "host", 8), FileTier(tmp_path / "disk", 8))
    for k in "abc":
        store.put(k, k.encode() * 4)  # a spills to disk
    assert not store.host.exists("a") and store.disk is not None and store.disk.exists("a")
    claims = store.claimed_prefix(["a", "b", "c", "z"], "t")
    assert [c.read_bytes() for c in claims] == [b"aaaa", b"bbbb", b"cccc"]
    store.put("d", b"dddd")
    store.put("e", b"eeee")  # disk full too: the oldest on disk is gone for good
    assert store.host.used_bytes <= 8 and store.disk.used_bytes <= 8
    assert not store.exists("a") and claims[0].read_bytes() == b"aaaa"
    store.put("c", b"CCCC")  # a newer copy supersedes any spilled one
    assert store.exists("c") and not store.disk.exists("c")


def test_claimed_prefix_stops_at_the_first_missing_block(tmp_path):
    store = TieredStore(FileTier(tmp_path / "host", 100))
    for k in ("h0", "h1", "h3"):
        store.put(k, b"x")
    assert len(store.claimed_prefix(["h0", "h1", "h2", "h3"], "t")) == 2
    assert store.claimed_prefix(["z"], "t") == []


def test_a_refused_write_is_a_miss_not_an_error(tmp_path, monkeypatch):
    import errno

    tier = FileTier(tmp_path / "host", 100)
    assert tier.put("old", b"v")

    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")  # e.g. a full /dev/shm

    monkeypatch.setattr(Path, "write_bytes", full)
    assert not tier.put("k", b"v") and not tier.exists("k") and tier.stats.failed_writes == 1
    assert tier.exists("old") and not list(tier.root.glob(".*.tmp"))


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 12)), max_size=40),
       st.integers(0, 30))
@settings(max_examples=60, deadline=None)
def test_file_tier_never_exceeds_capacity_and_keeps_the_newest(tmp_path_factory, ops, cap):
    tier = FileTier(tmp_path_factory.mktemp("tier"), cap)
    model: dict[str, bytes] = {}
    for key, size in ops:
        data = key.encode() * size
        model.pop(key, None)
        if tier.put(key, data):
            model[key] = data
        while sum(len(v) for v in model.values()) > cap:  # the oldest go first
            model.pop(next(iter(model)))
        assert tier.used_bytes <= cap
        assert set(tier.keys()) == set(model)
    for k, v in model.items():
        assert tier.path(k).read_bytes() == v
