"""KV-cache tiers outside vLLM's block pool: a bounded host-memory pool and local disk.

Boundary: capacity and eviction only. Entries are opaque byte strings (a KV block's tensors,
serialised by the connector) under opaque keys (a block hash chained with the adapter, so one
adapter's KV never serves another's). No vLLM, no torch, no clock: LRU order is the only time.

Tiering: ``put`` writes to host memory; what host memory evicts spills to disk when a disk tier
is configured, and is dropped otherwise. ``get`` looks in host memory, then on disk (and
promotes a disk hit back to host memory). A missing key is a miss: the caller recomputes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TierStats:
    stored_blocks: int = 0
    stored_bytes: int = 0
    hits: int = 0
    misses: int = 0
    evicted_blocks: int = 0
    evicted_bytes: int = 0
    spilled_blocks: int = 0


class HostPool:
    """An LRU map of key -> bytes bounded by total bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self.used_bytes = 0
        self.stats = TierStats()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, data: bytes) -> list[tuple[str, bytes]]:
        """Store ``data``; return the entries evicted to make room (oldest first).

        An entry larger than the whole pool is not stored (it is returned as evicted).
        """
        old = self._entries.pop(key, None)
        if old is not None:
            self.used_bytes -= len(old)
        if len(data) > self.capacity_bytes:
            return [(key, data)]
        evicted: list[tuple[str, bytes]] = []
        while self.used_bytes + len(data) > self.capacity_bytes:
            k, v = self._entries.popitem(last=False)
            self.used_bytes -= len(v)
            self.stats.evicted_blocks += 1
            self.stats.evicted_bytes += len(v)
            evicted.append((k, v))
        self._entries[key] = data
        self.used_bytes += len(data)
        self.stats.stored_blocks += 1
        self.stats.stored_bytes += len(data)
        return evicted

    def get(self, key: str) -> bytes | None:
        data = self._entries.get(key)
        if data is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return data

    def discard(self, key: str) -> None:
        data = self._entries.pop(key, None)
        if data is not None:
            self.used_bytes -= len(data)


class DiskTier:
    """Files under one folder, bounded by total bytes, LRU by access (kept in memory)."""

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.stats = TierStats()

    def _path(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.capacity_bytes:
            return
        self.discard(key)
        while self.used_bytes + len(data) > self.capacity_bytes:
            k, size = self._sizes.popitem(last=False)
            self._path(k).unlink(missing_ok=True)
            self.used_bytes -= size
            self.stats.evicted_blocks += 1
            self.stats.evicted_bytes += size
        self._path(key).write_bytes(data)
        self._sizes[key] = len(data)
        self.used_bytes += len(data)
        self.stats.stored_blocks += 1
        self.stats.stored_bytes += len(data)

    def get(self, key: str) -> bytes | None:
        if key not in self._sizes:
            self.stats.misses += 1
            return None
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:  # removed behind our back: a miss, never an error
            self.used_bytes -= self._sizes.pop(key)
            self.stats.misses += 1
            return None
        self._sizes.move_to_end(key)
        self.stats.hits += 1
        return data

    def discard(self, key: str) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._path(key).unlink(missing_ok=True)
            self.used_bytes -= size


class TieredStore:
    """Host memory first, disk behind it (optional)."""

    def __init__(self, host: HostPool, disk: DiskTier | None = None) -> None:
        self.host = host
        self.disk = disk

    def __contains__(self, key: str) -> bool:
        return key in self.host or (self.disk is not None and key in self.disk)

    def put(self, key: str, data: bytes) -> None:
        for k, v in self.host.put(key, data):
            if self.disk is not None:
                self.disk.put(k, v)
                self.host.stats.spilled_blocks += 1

    def get(self, key: str) -> bytes | None:
        data = self.host.get(key)
        if data is not None or self.disk is None:
            return data
        data = self.disk.get(key)
        if data is not None:
            self.disk.discard(key)
            self.put(key, data)  # promote; may spill colder entries
        return data

    def matched_prefix(self, keys: list[str]) -> int:
        """How many of ``keys`` (a request's block chain, in order) are stored, from the start."""
        n = 0
        for k in keys:
            if k not in self:
                break
            n += 1
        return n

    def discard(self, key: str) -> None:
        """Drop ``key`` from every tier (a finished request's blocks)."""
        self.host.discard(key)
        if self.disk is not None:
            self.disk.discard(key)
