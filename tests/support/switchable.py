"""A registry that can be switched off, and a clock the test moves: the tenancy layer's
outage tests drive both (``tests/faults``), usually through :func:`offline_world`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import AdapterRecord, ApiKey, Tenant
from lorafleet.adapters.registry import SQLiteRegistry
from lorafleet.serving.api.tenancy import Tenancy

__all__ = ["BASE", "Clock", "OfflineWorld", "Switchable", "adapter_record", "offline_world"]

BASE = "base-model"


class Switchable:
    """Wraps a registry; every call raises ``RegistryUnavailable`` while ``down``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise RegistryUnavailable("registry switched off by the test")
            return await attr(*args, **kwargs)

        return call


class Clock:
    """A clock the test moves: calling it reads ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def adapter_record(tenant: str, name: str) -> AdapterRecord:
    """A registry record of an adapter for :data:`BASE` (never loaded: no files behind it)."""
    return AdapterRecord(tenant=tenant, name=name, source="/x", base_model=BASE, digest="d" * 64,
                         rank=4, alpha=8.0, target_modules=("q_proj",), size_bytes=1)


@dataclass
class OfflineWorld:
    registry: Switchable
    tenancy: Tenancy
    clock: Clock
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> "Bearer <key>"
    key_ids: dict[str, str] = field(default_factory=dict)


@asynccontextmanager
async def offline_world(db: Path, tenants: tuple[str, ...] = ("alice",)) -> AsyncIterator[OfflineWorld]:
    """A SQLite registry behind :class:`Switchable` holding `tenants` (a key each) and alice's
    adapter ``pirate``, and the ingress's :class:`Tenancy` on it with a :class:`Clock`."""
    inner = SQLiteRegistry(str(db))
    world = OfflineWorld(Switchable(inner), None, Clock())  # type: ignore[arg-type]
    for name in tenants:
        await inner.put_tenant(Tenant(name, name.title()))
        key, key_id = generate_key()
        await inner.add_key(ApiKey(key_id, name, hash_key(key), 0.0))
        world.keys[name], world.key_ids[name] = f"Bearer {key}", key_id
    await inner.put_adapter(adapter_record("alice", "pirate"))
    world.tenancy = Tenancy(world.registry, BASE, clock=world.clock)  # type: ignore[arg-type]
    try:
        yield world
    finally:
        await inner.close()
