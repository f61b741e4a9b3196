"""KV-cache tiers outside vLLM's block pool: files in host memory (tmpfs) and on local disk.

Boundary: capacity, eviction and file handling only. Entries are opaque byte strings (a KV
block's tensors, serialised by the connector) under opaque keys. No vLLM, no torch, no clock:
LRU order is the only time.

Why files: vLLM runs its scheduler (which decides what to restore) and its worker (which
holds the KV tensors and does the copies) in different processes on the CPU backend. A
tier that is a folder is visible to both: the worker writes and evicts (it alone keeps the
accounting), the scheduler only looks (``exists``) and *claims* what it will restore. A
claim is a hard link: if the worker evicts or rewrites the entry afterwards (writes always
go to a new file that replaces the name), the claimed bytes stay readable until the load
is done. The host tier is a folder on a memory filesystem (``/dev/shm``), the disk tier one
on local disk.

Tiering: ``put`` writes to the host tier; what it evicts spills to the disk tier when one is
configured, and is dropped otherwise. A missing key is a miss: the caller recomputes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TierStats:
    evicted_blocks: int = 0
    failed_writes: int = 0


class FileTier:
    """Files under one folder, bounded by total bytes, LRU by write order.

    The writing process keeps the accounting (``put``/``discard``); any process may call
    ``exists``/``claim`` on its own instance over the same folder."""

    def __init__(self, root: Path, capacity_bytes: int, spill_to: FileTier | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.root = Path(root)
        self.claims = self.root / "claims"
        self.claims.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.spill_to = spill_to
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.used_bytes = 0
        self.stats = TierStats()

    def path(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def keys(self) -> Iterator[str]:
        return iter(self._sizes)

    # -- writer side ------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` (evicting the oldest entries to make room); ``False`` if it could
        not be stored (larger than the tier, or the filesystem refused the write)."""

        def write(dest: Path) -> None:
            tmp = self.root / f".{dest.name}.tmp"
            try:
                tmp.write_bytes(data)
                os.replace(tmp, dest)  # a new file: a claim on the old one keeps its bytes
            except OSError:
                tmp.unlink(missing_ok=True)
                raise

        return self._store(key, len(data), write)

    def adopt(self, key: str, src: Path) -> bool:
        """Take over ``src`` (another tier's file) as ``key``'s entry."""
        return self._store(key, src.stat().st_size, lambda dest: shutil.move(src, dest))

    def _store(self, key: str, size: int, write: Callable[[Path], object]) -> bool:
        self.discard(key)
        if size > self.capacity_bytes:
            return False
        while self.used_bytes + size > self.capacity_bytes:
            self._evict_oldest()
        try:
            write(self.path(key))
        except OSError:  # e.g. a full /dev/shm: a miss later, the request recomputes
            self.stats.failed_writes += 1
            return False
        self._sizes[key] = size
        self.used_bytes += size
        return True

    def _evict_oldest(self) -> None:
        key, size = self._sizes.popitem(last=False)
        self.used_bytes -= size
        self.stats.evicted_blocks += 1
        path = self.path(key)
        if self.spill_to is not None and path.exists() and self.spill_to.adopt(key, path):
            return
        path.unlink(missing_ok=True)

    def discard(self, key: str) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.path(key).unlink(missing_ok=True)
            self.used_bytes -= size

    # -- any process ------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def claim(self, key: str, tag: str) -> Path | None:
        """A hard link to ``key``'s file that outlives its eviction; ``None`` if absent."""
        link = self.claims / f"{self.path(key).name}.{tag}"
        try:
            os.link(self.path(key), link)
        except FileExistsError:
            return link
        except OSError:
            return None
        return link


class TieredStore:
    """The host tier first, the disk tier behind it (optional)."""

    def __init__(self, host: FileTier, disk: FileTier | None = None) -> None:
        self.host = host
        self.disk = disk
        host.spill_to = disk

    def tiers(self) -> list[FileTier]:
        return [self.host] if self.disk is None else [self.host, self.disk]

    def put(self, key: str, data: bytes) -> bool:
        if self.disk is not None:
            self.disk.discard(key)  # a newer copy supersedes a spilled one
        return self.host.put(key, data)

    def exists(self, key: str) -> bool:
        return any(t.exists(key) for t in self.tiers())

    def claim(self, key: str, tag: str) -> Path | None:
        for t in self.tiers():
            link = t.claim(key, tag)
            if link is not None:
                return link
        return None

    def claimed_prefix(self, keys: list[str], tag: str) -> list[Path]:
        """Claims on the leading ``keys`` (a request's blocks, in order) that are stored."""
        out: list[Path] = []
        for k in keys:
            link = self.claim(k, tag)
            if link is None:
                break
            out.append(link)
        return out

    def discard(self, key: str) -> None:
        """Drop ``key`` from every tier (a finished request's blocks)."""
        for t in self.tiers():
            t.discard(key)
