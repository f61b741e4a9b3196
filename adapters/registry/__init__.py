"""The registry: tenants, API keys, adapters and placement, behind one async interface.

Boundary: `open_registry(url)` is the only factory; it knows `sqlite:///abs/path.db`,
`sqlite:relative.db` and `redis://` / `rediss://` / `unix://` URLs and refuses anything else.
"""

from __future__ import annotations

from .base import Registry
from .identity import RegistryIdentity, RegistryReset, RegistryTrust, decide_registry_trust
from .redis import RedisRegistry
from .sqlite import SQLiteRegistry

__all__ = [
    "RedisRegistry",
    "Registry",
    "RegistryIdentity",
    "RegistryReset",
    "RegistryTrust",
    "SQLiteRegistry",
    "decide_registry_trust",
    "open_registry",
]


def open_registry(url: str) -> Registry:
    """Build the registry a URL names (connections are opened lazily, on first use)."""
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]  # sqlite:///abs -> /abs ; sqlite://rel is not a thing
        if not path.startswith("/"):
            raise ValueError(f"{url!r}: use sqlite:///absolute/path.db or sqlite:relative.db")
        return SQLiteRegistry(path)
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if not path:
            raise ValueError(f"{url!r}: no database path")
        return SQLiteRegistry(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRegistry(url)
    raise ValueError(f"unsupported registry URL {url!r}: use sqlite:///path.db, "
                     "sqlite:relative.db or redis://host:port/db")
