"""On-disk, content-addressed adapter cache with an LRU bound in bytes and pinning.

Boundary: files only; no knowledge of tenants or registries. Layout:

    <root>/<digest>/            one validated adapter (immutable once there)
    <root>/.staging/            temp dirs: entries are written here, then renamed into place
    <root>/.pins/<digest>.<pid>.<n>   one file per pin, so other processes see pins too
    <root>/.keep/<digest>       the entry may be the only copy anywhere: never evicted

Recency is the entry directory's mtime (touched by `get`/`put`): no index file to corrupt.
`decide_evictions` (pure) picks the victims: least recently used first, never a pinned entry
(in use: loaded in an engine, or being read) and never a kept one (nothing could bring it back:
no shared store copy and a source another node cannot read). Eviction renames an entry away
before deleting it, so a reader sees a whole entry or none.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import CacheError, CacheFull

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _copy_or_full(src: str, dst: str) -> object:
    """``shutil.copy2`` that raises ``CacheFull`` on a full disk.

    ``copytree`` folds the OSErrors of its copies into one ``shutil.Error`` of strings and
    keeps copying; a non-OSError stops it at once and keeps the reason readable.
    """
    try:
        return shutil.copy2(src, dst)
    except OSError as e:
        if e.errno in _NO_ROOM:
            raise CacheFull(f"no space left on the adapter cache's disk ({e.strerror})") from e
        raise

__all__ = ["AdapterCache", "CacheEntry", "decide_evictions"]

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    digest: str
    size_bytes: int
    last_used: float


def decide_evictions(
    entries: Sequence[CacheEntry], max_bytes: int, pinned: frozenset[str],
    kept: frozenset[str] = frozenset(),
) -> list[str]:
    """Least recently used entries to drop until the total fits `max_bytes`.

    Pinned entries (in use) and kept ones (possibly the only copy of a registered adapter) are
    never chosen, even if the cache stays over budget because of them: a full cache is an
    operational problem, a deleted only copy is lost data.
    """
    total = sum(e.size_bytes for e in entries)
    victims = []
    for entry in sorted(entries, key=lambda e: (e.last_used, e.digest)):
        if total <= max_bytes:
            break
        if entry.digest in pinned or entry.digest in kept:
            continue
        victims.append(entry.digest)
        total -= entry.size_bytes
    return victims


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AdapterCache:
    def __init__(self, root: Path | str, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._staging = self.root / ".staging"
        self._pins = self.root / ".pins"
        self._keep = self.root / ".keep"
        for d in (self.root, self._staging, self._pins, self._keep):
            d.mkdir(parents=True, exist_ok=True)
        # Guards _pin_files and makes put/evict of one process serial; other processes are
        # kept safe by atomic renames and by pin files on disk.
        self._lock = threading.RLock()
        self._pin_files: dict[str, list[Path]] = {}
        self._counter = itertools.count()

    # --- lookups ---

    def path_of(self, digest: str) -> Path:
        if _DIGEST.fullmatch(digest) is None:
            raise CacheError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest

    def get(self, digest: str) -> Path | None:
        """The entry's directory (and mark it recently used), or None."""
        path = self.path_of(digest)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def __contains__(self, digest: str) -> bool:
        return self.path_of(digest).is_dir()

    def entries(self) -> list[CacheEntry]:
        out = []
        for child in self.root.iterdir():
            if _DIGEST.fullmatch(child.name) and child.is_dir():
                try:
                    out.append(CacheEntry(child.name, _dir_size(child), child.stat().st_mtime))
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
        return out

    def total_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())

    # --- writes ---

    def put(self, src_dir: Path | str, digest: str, *, keep: bool = False) -> Path:
        """Copy `src_dir` in as `digest` (no-op when present), evict to fit, return its path.

        `keep`: this copy may be the only one (nothing can fetch it again), so eviction must
        leave it alone until `unkeep` or `remove`.
        """
        target = self.path_of(digest)
        src = Path(src_dir)
        if not src.is_dir():
            raise CacheError(f"{src} is not a directory")
        with self._lock:
            marked = keep and not (self._keep / digest).exists()
            if keep:  # before the entry appears, so no other process's eviction can race it
                (self._keep / digest).touch()
            if self.get(digest) is None:
                staging = self._staging / f"{digest}.{uuid.uuid4().hex}"
                stored = False
                try:
                    try:
                        shutil.copytree(src, staging, symlinks=True, copy_function=_copy_or_full)
                    except OSError as e:  # e.g. mkdir of the staging dir on a full disk
                        if e.errno in _NO_ROOM:
                            raise CacheFull(f"no space left on the adapter cache's disk "
                                            f"({e.strerror})") from e
                        raise
                    try:
                        os.rename(staging, target)  # atomic; fails if another writer won
                    except OSError:
                        if not target.is_dir():
                            raise
                    stored = True
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
                    if marked and not stored:  # a failed write leaves nothing behind
                        (self._keep / digest).unlink(missing_ok=True)
                os.utime(target)
            with self.pinned(digest):  # the entry just written is never its own victim
                self.evict()
        return target

    def evict(self) -> list[str]:
        """Drop least recently used unpinned entries until under `max_bytes`; return them."""
        with self._lock:
            victims = decide_evictions(self.entries(), self.max_bytes, self.pinned_digests(),
                                       self.kept_digests())
            for digest in victims:
                trash = self._staging / f"evict.{digest}.{uuid.uuid4().hex}"
                try:
                    os.rename(self.root / digest, trash)
                except FileNotFoundError:
                    continue
                shutil.rmtree(trash, ignore_errors=True)
            return victims

    def remove(self, digest: str) -> bool:
        """Drop one entry unless pinned; return whether it was dropped."""
        with self._lock:
            if digest in self.pinned_digests():
                return False
            trash = self._staging / f"evict.{digest}.{uuid.uuid4().hex}"
            try:
                os.rename(self.path_of(digest), trash)
            except FileNotFoundError:
                return False
            (self._keep / digest).unlink(missing_ok=True)
            shutil.rmtree(trash, ignore_errors=True)
            return True

    # --- keeps ---

    def kept_digests(self) -> frozenset[str]:
        """Entries that eviction leaves alone: copies nothing else could bring back."""
        return frozenset(p.name for p in self._keep.iterdir() if _DIGEST.fullmatch(p.name))

    def unkeep(self, digest: str) -> None:
        """The entry can be fetched again (e.g. it reached the shared store): evictable again."""
        (self._keep / self.path_of(digest).name).unlink(missing_ok=True)

    # --- pins ---

    def pin(self, digest: str) -> None:
        """Protect an entry from eviction until the matching `unpin` (pins nest)."""
        self.path_of(digest)
        with self._lock:
            pin_file = self._pins / f"{digest}.{os.getpid()}.{next(self._counter)}"
            pin_file.touch()
            self._pin_files.setdefault(digest, []).append(pin_file)

    def unpin(self, digest: str) -> None:
        with self._lock:
            files = self._pin_files.get(digest)
            if not files:
                raise CacheError(f"{digest} is not pinned by this process")
            files.pop().unlink(missing_ok=True)
            if not files:
                del self._pin_files[digest]

    @contextmanager
    def pinned(self, digest: str) -> Iterator[Path]:
        self.pin(digest)
        try:
            yield self.path_of(digest)
        finally:
            self.unpin(digest)

    def pinned_digests(self) -> frozenset[str]:
        """Digests pinned by any live process (pins left by dead processes are cleaned up)."""
        pinned = set()
        for pin_file in self._pins.iterdir():
            digest, _, rest = pin_file.name.partition(".")
            pid = rest.partition(".")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                pin_file.unlink(missing_ok=True)
                continue
            pinned.add(digest)
        return frozenset(pinned)

    def touch(self, digest: str, when: float | None = None) -> None:
        """Set an entry's last-used time (tests and warm-up use it)."""
        t = time.time() if when is None else when
        os.utime(self.path_of(digest), (t, t))
