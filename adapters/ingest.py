"""Importing an adapter: fetch, validate, store, cache, register, in that order.

Boundary: orchestration only; each step is another module's. Nothing touches the registry until the
adapter is fetched, validated, copied to the shared store (when one is configured) and safely in
the cache, so a refused adapter leaves no record. The record names content (digest, source,
secretRef, the store's copy), never this node's cache path: other nodes fetch it by digest
(`materialize`). Blocking steps (network, disk, hashing) run in threads so the event loop keeps
serving; fetching and validating run in a bounded worker process (`sandbox`), because adapter
content is client input that can cost CPU and memory at will.

At most one import per (tenant, name) runs at a time, and at most `max_concurrent` in this
process: a retry that arrives while the first attempt still runs is refused (`IntakeBusy`, 503)
instead of starting a second fetch of the same source.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .basemodel import BaseModelInfo
from .cache import AdapterCache
from .errors import IntakeBusy, NotFound
from .materialize import decide_refetchable
from .model import AdapterContent, AdapterRecord, validate_name
from .registry.base import Registry
from .sandbox import IntakeSettings, check_adapter
from .secrets import SecretResolver
from .sources import FetchCredentials
from .store import SharedStore
from .validation import AdapterManifest, ValidationLimits

__all__ = ["IntakeGate", "import_adapter"]


class IntakeGate:
    """Who may start an intake worker now: one per (tenant, name), `max_concurrent` in all.

    Thread-safe: a slot is taken on the event loop and given back by the worker thread when
    its child process has ended (even if the request that started it was cancelled meanwhile).
    """

    def __init__(self, max_concurrent: int) -> None:
        self.max_concurrent = max_concurrent
        # Guards `_running`: the set of (tenant, name) whose worker has not ended yet.
        self._lock = threading.Lock()
        self._running: set[tuple[str, str]] = set()

    def enter(self, tenant: str, name: str) -> None:
        with self._lock:
            if (tenant, name) in self._running:
                raise IntakeBusy(f"adapter {tenant}/{name} is already being imported; retry "
                                 "when that import has finished")
            if len(self._running) >= self.max_concurrent:
                raise IntakeBusy(f"{self.max_concurrent} adapter imports are running; retry "
                                 "later")
            self._running.add((tenant, name))

    def leave(self, tenant: str, name: str) -> None:
        with self._lock:
            self._running.discard((tenant, name))

    def running(self) -> int:
        with self._lock:
            return len(self._running)


_default: tuple[IntakeSettings, IntakeGate] | None = None


def default_intake() -> tuple[IntakeSettings, IntakeGate]:
    """This process's intake settings (from `LORAFLEET_INTAKE_*`, read once) and its gate,
    for callers that do not inject their own."""
    global _default
    if _default is None:
        settings = IntakeSettings()
        _default = (settings, IntakeGate(settings.max_concurrent))
    return _default


async def _checked(tenant: str, name: str, source: str, fetched: Path, base: BaseModelInfo,
                   limits: ValidationLimits, settings: IntakeSettings, gate: IntakeGate,
                   credentials: FetchCredentials | None) -> tuple[Path, AdapterManifest]:
    """Run the worker with a gate slot; the slot is held until the worker has ended."""
    gate.enter(tenant, name)
    abandoned = threading.Event()

    def work() -> tuple[Path, AdapterManifest]:
        try:
            return check_adapter(source, fetched, base=base, limits=limits, settings=settings,
                                 credentials=credentials)
        finally:
            gate.leave(tenant, name)
            if abandoned.is_set():  # nobody is left to clean up after this worker
                shutil.rmtree(fetched.parent, ignore_errors=True)

    job = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        # Shielded: a cancelled request must not cancel a job the executor has not started
        # yet (its slot would never be given back); the worker ends at its deadline anyway.
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        abandoned.set()
        raise


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
    settings: IntakeSettings | None = None,
    gate: IntakeGate | None = None,
) -> AdapterRecord:
    """Fetch `source`, validate it against `base`, store and cache it, register it for `tenant`.

    `secret_ref` names the credentials of the source (read through `secrets` unless
    `credentials` are given); it is recorded so that other nodes fetch with the same ones.
    `settings` and `gate` bound the work (defaults: this process's, see `default_intake`).
    Raises `InvalidName`, `NotFound` (unknown tenant), `IntakeBusy`, `AdapterFetchError` or
    `AdapterValidationError` before any registry write; `RegistryError` from the final write.
    """
    if settings is None or gate is None:
        default_settings, default_gate = default_intake()
        settings, gate = settings or default_settings, gate or default_gate
    validate_name(tenant, "tenant name")
    validate_name(name, "adapter name")
    if await registry.get_tenant(tenant) is None:
        raise NotFound(f"tenant {tenant!r} does not exist")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="import-", dir=work_dir))
    stored_at = None
    cancelled = False
    try:
        if credentials is None and secret_ref is not None:
            credentials = await asyncio.to_thread(
                (secrets or SecretResolver(None)).credentials, secret_ref, source)
        try:
            fetched, manifest = await _checked(tenant, name, source, scratch / "fetched", base,
                                               limits, settings, gate, credentials)
        except asyncio.CancelledError:
            cancelled = True  # the worker thread removes the scratch space when it ends
            raise
        if store is not None:
            stored_at = await asyncio.to_thread(store.put, fetched, manifest.digest,
                                                manifest.files)
        content = AdapterContent(manifest.digest, source, secret_ref, stored_at)
        await asyncio.to_thread(cache.put, fetched, manifest.digest,
                                keep=not decide_refetchable(content))
    finally:
        if not cancelled:
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
