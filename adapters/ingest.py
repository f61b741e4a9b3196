"""Importing an adapter: fetch, validate, store, cache, register, in that order.

Boundary: orchestration only; each step is another module's. Nothing touches the registry until the
adapter is fetched, validated, copied to the shared store (when one is configured) and safely in
the cache, so a refused adapter leaves no record. The record names content (digest, source,
secretRef, the store's copy), never this node's cache path: other nodes fetch it by digest
(`materialize`). Blocking steps (network, disk, hashing) run in threads so the event loop keeps
serving.
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
from .materialize import decide_refetchable
from .model import AdapterContent, AdapterRecord, validate_name
from .registry.base import Registry
from .secrets import SecretResolver
from .sources import FetchCredentials, fetch_adapter
from .store import SharedStore
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
    secret_ref: str | None = None,
    secrets: SecretResolver | None = None,
    store: SharedStore | None = None,
    clock: Callable[[], float] = time.time,
) -> AdapterRecord:
    """Fetch `source`, validate it against `base`, store and cache it, register it for `tenant`.

    `secret_ref` names the credentials of the source (read through `secrets` unless
    `credentials` are given); it is recorded so that other nodes fetch with the same ones.
    Raises `InvalidName`, `NotFound` (unknown tenant), `AdapterFetchError` or
    `AdapterValidationError` before any registry write; `RegistryError` from the final write.
    """
    validate_name(tenant, "tenant name")
    validate_name(name, "adapter name")
    if await registry.get_tenant(tenant) is None:
        raise NotFound(f"tenant {tenant!r} does not exist")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="import-", dir=work_dir))
    stored_at = None
    try:
        if credentials is None and secret_ref is not None:
            credentials = await asyncio.to_thread(
                (secrets or SecretResolver(None)).credentials, secret_ref, source)
        fetched = await asyncio.to_thread(
            fetch_adapter, source, scratch / "fetched", max_bytes=limits.max_bytes,
            credentials=credentials)
        manifest = await asyncio.to_thread(validate_adapter_dir, fetched, base, limits)
        if store is not None:
            stored_at = await asyncio.to_thread(store.put, fetched, manifest.digest,
                                                manifest.files)
        content = AdapterContent(manifest.digest, source, secret_ref, stored_at)
        await asyncio.to_thread(cache.put, fetched, manifest.digest,
                                keep=not decide_refetchable(content))
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
        shared=shared,
        created_at=clock(),
        secret_ref=secret_ref,
        stored_at=stored_at,
    )
    await registry.put_adapter(record)
    return record
