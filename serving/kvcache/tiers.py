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

Hygiene: a tier folder holds other tenants' KV blocks (their prompts, in effect), so it is
created with mode 0700, and an existing one owned by another user is refused. A crashed engine
cannot remove its folders, and its restart picks a new engine id: a tier folder named
``lorafleet-kv-<id>`` records its creator (pid and start time, in ``owner``), and creating one
removes the siblings whose creator is gone (:func:`sweep_stale_tiers`), so a crash loop does not
fill ``/dev/shm``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

TIER_PREFIX = "lorafleet-kv-"
OWNER_FILE = "owner"
# A tier folder without an owner file (written before owners were recorded) is removed once it
# has not changed for this long.
_OWNERLESS_STALE_S = 3600.0


def _process_identity(pid: int) -> str | None:
    """`"<pid> <start time>"` of a live process, None if it is gone (pids are reused; the
    start time tells a new process from the one that wrote the owner file)."""
    try:
        return f"{pid} {psutil.Process(pid).create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # alive, someone else's
        return f"{pid} ?"


def _owner_alive(owner_text: str) -> bool:
    pid_text, _, started = owner_text.strip().partition(" ")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    identity = _process_identity(pid)
    return identity is not None and (identity.endswith("?") or identity == f"{pid} {started}")


def sweep_stale_tiers(parent: Path, *, keep: Path | None = None,
                      now: float | None = None) -> list[Path]:
    """Remove this user's ``lorafleet-kv-*`` folders under ``parent`` whose creator has exited.

    Returns what was removed. A folder whose owner file cannot be read is left alone unless it
    has not changed for an hour (written by a version that recorded no owner).
    """
    removed: list[Path] = []
    now = time.time() if now is None else now
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(TIER_PREFIX)]
    except OSError:
        return removed
    for path in candidates:
        try:
            info = path.lstat()
            if path == keep or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue
            owner = path / OWNER_FILE
            if owner.exists():
                stale = not _owner_alive(owner.read_text())
            else:
                stale = now - info.st_mtime > _OWNERLESS_STALE_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d KV tier folder(s) left by exited engines under %s", len(removed),
                 parent)
    return removed


def _private_dir(root: Path) -> bool:
    """Create ``root`` with mode 0700 (True), or check an existing one is ours and private
    (False: another process of the same engine created it)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        root.mkdir(mode=0o700)
        created = True
    except FileExistsError:
        created = False
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(f"KV tier folder {root} is not a directory owned by this user")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(root, 0o700)  # mkdir's mode is masked by the umask; never wider than 0700
    return created


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
        created = _private_dir(self.root)
        if self.root.name.startswith(TIER_PREFIX):
            if created:
                identity = _process_identity(os.getpid())
                fd = os.open(self.root / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"{identity}\n")
            sweep_stale_tiers(self.root.parent, keep=self.root)
        self.claims = self.root / "claims"
        self.claims.mkdir(exist_ok=True)
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
