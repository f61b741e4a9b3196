"""Importing an adapter: fetch, validate, cache, register, in that order.

Boundary: orchestration only; each step is another module's. Nothing touches the registry until the
adapter is fetched, validated and safely in the cache, so a refused adapter leaves no record.
Blocking steps (network, disk, hashing) run in threads so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .basemodel import BaseModelInfo
from .cache import AdapterCache
from .errors import NotFound
from .model import AdapterRecord, validate_name
from .registry.base import Registry
from .sources import FetchCredentials, fetch_adapter
from .validation import ValidationLimits, validate_adapter_dir

__all__ = ["import_adapter"]


async def import_adapter(
    *,
    tenant: str,
    name: str,
    source: str,
    shared: bool,
    registry: Registry,
    cache: AdapterCache,
    base: BaseModelInfo,
    limits: ValidationLimits,
    work_dir: Path | str,
    credentials: FetchCredentials | None = None,
    clock: Callable[[], float] = time.time,
) -> AdapterRecord:
    """Fetch `source`, validate it against `base`, cache it and register it for `tenant`.

    Raises `InvalidName`, `NotFound` (unknown tenant), `AdapterFetchError` or
    `AdapterValidationError` before any registry write; `RegistryError` from the final write.
    """
    validate_name(tenant, "tenant name")
    validate_name(name, "adapter name")
    if await registry.get_tenant(tenant) is None:
        raise NotFound(f"tenant {tenant!r} does not exist")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="import-", dir=work_dir))
    try:
        fetched = await asyncio.to_thread(
            fetch_adapter, source, scratch / "fetched", max_bytes=limits.max_bytes,
            credentials=credentials)
        manifest = await asyncio.to_thread(validate_adapter_dir, fetched, base, limits)
        cached = await asyncio.to_thread(cache.put, fetched, manifest.digest)
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)
    record = AdapterRecord(
        tenant=tenant,
        name=name,
        source=source,
        base_model=base.name,
        digest=manifest.digest,
        rank=manifest.rank,
        alpha=manifest.alpha,
        target_modules=manifest.target_modules,
        size_bytes=manifest.size_bytes,
        local_path=str(cached),
        shared=shared,
        created_at=clock(),
    )
    await registry.put_adapter(record)
    return record
