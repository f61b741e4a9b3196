"""Content digest of an adapter directory.

Boundary: `digest_of` is pure (over `(filename, file sha256)` pairs); `digest_files` reads files.
The digest is sha256 over the accepted files sorted by name, each contributing
`<name>\\0<sha256 hex of its bytes>\\n`; it names the cache entry and ends the adapter id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["digest_files", "digest_of", "sha256_file"]

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_of(entries: Iterable[tuple[str, str]]) -> str:
    """Digest of `(filename, sha256 hex)` pairs; the order of `entries` does not matter."""
    h = hashlib.sha256()
    for name, file_hash in sorted(entries):
        h.update(name.encode("utf-8") + b"\0" + file_hash.encode("ascii") + b"\n")
    return h.hexdigest()


def digest_files(directory: Path, names: Iterable[str]) -> str:
    """Digest of the named files inside `directory`."""
    return digest_of((name, sha256_file(directory / name)) for name in names)
