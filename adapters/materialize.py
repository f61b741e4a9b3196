"""Materializing an adapter on this node: from its content (digest + where it can be had) to a
verified, validated directory in this node's cache, which the engine then loads.

Boundary: this module decides where to look and in which order (pure: `decide_origins`,
`decide_refetchable`) and runs the fetch (I/O: `Materializer`). It knows no registry and no
engine; the replica hands it an `AdapterContent` (from the registry record) and gets a path.

    registry record ──content──> Materializer.acquire(content) ──> <data_dir>/adapter-cache/<digest>
                                   │ cache hit: touch (LRU), pin, done
                                   │ miss: one fetch per digest (concurrent callers share it)
                                   ├─ 1. the shared store (a verified copy; no tenant credentials)
                                   ├─ 2. the copy the record names (`stored_at`), if elsewhere
                                   └─ 3. the registered source, with its secretRef's credentials
                                   each candidate: digest must match, validation runs again,
                                   then the cache takes it (kept if nothing could fetch it again)

Why validate again: the bytes crossed a network and a bucket someone else may write to; the
digest proves they are the bytes that were validated, and validation proves they still fit the
base model this node serves (a node may run a different model build). Why one fetch per digest:
a burst of requests for a cold adapter must not download it N times. Why pins: a loaded adapter's
files are what vLLM reads when it reloads the adapter; eviction must never delete them.

Entry point for a replica (what `serving.deploy.EngineReplica` and the engine use):

    path = await materializer.acquire(record.content)   # pinned until release
    ... engine loads `path` ...
    materializer.release(record.digest)                 # when the engine drops it
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from .basemodel import BaseModelInfo
from .cache import AdapterCache
from .errors import AdapterFetchError, AdapterValidationError, CacheError
from .model import AdapterContent
from .secrets import SecretResolver
from .sources import fetch_adapter
from .store import SharedStore, open_store
from .validation import ValidationLimits, validate_adapter_dir

__all__ = ["Materializer", "Origin", "decide_origins", "decide_refetchable"]

log = logging.getLogger(__name__)

Origin = tuple[str, str]
"""`(kind, uri)`: kind is `store` (this node's shared store), `stored_at` (the copy the record
names, when this node has no store or another one) or `source` (the registered source)."""

# Sources another node can read again later. Local paths and file:// name this node's disk;
# hf:// reads only this node's Hugging Face cache (the service runs offline).
_REMOTE_SCHEMES = ("s3", "http", "https")


def decide_origins(content: AdapterContent, store_url: str | None) -> tuple[Origin, ...]:
    """Where to fetch `content` from, best first: the shared store, the record's copy, the source.

    The store comes first because it holds bytes that were already validated once and needs no
    tenant credentials; the source is last because it may be slow, rate-limited or changed.
    """
    origins: list[Origin] = []
    if store_url:
        origins.append(("store", store_url))
    if content.stored_at and not (
            store_url and content.stored_at == f"{store_url.rstrip('/')}/{content.digest}"):
        origins.append(("stored_at", content.stored_at))
    origins.append(("source", content.source))
    return tuple(origins)


def decide_refetchable(content: AdapterContent) -> bool:
    """Whether a node-local copy may be evicted: some copy other nodes can read exists."""
    if content.stored_at:
        return True
    scheme = urlsplit(content.source).scheme.lower() if "://" in content.source else ""
    return scheme in _REMOTE_SCHEMES


class Materializer:
    """Brings adapters' files to this node's cache, once per digest, verified and validated."""

    def __init__(
        self,
        cache: AdapterCache,
        *,
        base: BaseModelInfo,
        limits: ValidationLimits,
        work_dir: Path | str,
        store: SharedStore | None = None,
        secrets: SecretResolver | None = None,
        open_store_at: Callable[[str], SharedStore] = open_store,
    ) -> None:
        self.cache = cache
        self.base = base
        self.limits = limits
        self.work_dir = Path(work_dir)
        self.store = store
        self.secrets = secrets or SecretResolver(None)
        self._open_store_at = open_store_at
        # Guards "one fetch per digest in this process": the digest's running fetch, shared by
        # every caller that misses meanwhile. Touched only on the event loop's thread.
        self._inflight: dict[str, asyncio.Future[Path]] = {}
        self.last_fetch_seconds: float | None = None

    # --- the replica's entry points ---

    async def acquire(self, content: AdapterContent) -> Path:
        """The local directory of `content`, pinned (never evicted) until `release(digest)`."""
        # Pin before looking: an entry found (or written) now cannot be evicted in between.
        await asyncio.to_thread(self.cache.pin, content.digest)
        try:
            return await self.materialize(content)
        except BaseException:
            await asyncio.to_thread(self.cache.unpin, content.digest)
            raise

    def release(self, digest: str) -> None:
        """Undo one `acquire`: the copy may be evicted again once nobody else holds it.

        A release with no acquire left (an adapter dropped twice) is logged, not raised: it
        must not fail the unload that called it, and it leaves no pin behind."""
        try:
            self.cache.unpin(digest)
        except CacheError as e:
            log.warning("release without a matching acquire: %s", e)

    async def materialize(self, content: AdapterContent) -> Path:
        """The local directory of `content` (not pinned), fetching it once if missing.

        Raises `AdapterFetchError` (`transient` when a retry may help) or
        `AdapterValidationError`; nothing half-fetched is left in the cache.
        """
        path = await asyncio.to_thread(self.cache.get, content.digest)
        if path is not None:
            return path
        future = self._inflight.get(content.digest)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(self._fetch, content))
            self._inflight[content.digest] = future
            future.add_done_callback(lambda _: self._inflight.pop(content.digest, None))
        # Shielded: one caller giving up (client disconnect) must not cancel the others' fetch.
        return await asyncio.shield(future)

    # --- the fetch (blocking; runs in a thread) ---

    def _fetch(self, content: AdapterContent) -> Path:
        path = self.cache.get(content.digest)  # another process on this node may have won
        if path is not None:
            return path
        started = time.perf_counter()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="materialize-", dir=self.work_dir))
        failures: list[tuple[str, AdapterFetchError | AdapterValidationError]] = []
        try:
            for n, (kind, uri) in enumerate(decide_origins(content, self._store_url())):
                try:
                    fetched = self._fetch_from(kind, uri, content, scratch / f"{n}-{kind}")
                    manifest = validate_adapter_dir(fetched, self.base, self.limits)
                    if manifest.digest != content.digest:
                        raise AdapterFetchError(
                            f"{kind} holds other content (digest {manifest.digest[:12]}, "
                            f"registered {content.digest[:12]})", transient=False)
                except (AdapterFetchError, AdapterValidationError) as exc:
                    log.warning("adapter %s: %s %s failed: %s", content.digest[:12], kind, uri,
                                exc)
                    failures.append((kind, exc))
                    continue
                if kind != "store":
                    self._heal_store(fetched, content.digest, manifest.files)
                path = self.cache.put(fetched, content.digest,
                                      keep=not decide_refetchable(content))
                self.last_fetch_seconds = time.perf_counter() - started
                log.info("adapter %s fetched from %s in %.3f s", content.digest[:12], kind,
                         self.last_fetch_seconds)
                return path
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        raise _give_up(content, failures)

    def _store_url(self) -> str | None:
        return self.store.url if self.store is not None else None

    def _fetch_from(self, kind: str, uri: str, content: AdapterContent, dest: Path) -> Path:
        max_bytes = self.limits.max_bytes
        if kind == "store" and self.store is not None:
            return self.store.fetch(content.digest, dest, max_bytes=max_bytes)
        if kind == "stored_at":
            parent, _, digest = uri.rstrip("/").rpartition("/")
            if digest != content.digest:
                raise AdapterFetchError(f"{uri} does not name digest {content.digest[:12]}",
                                        transient=False)
            try:
                store = self._open_store_at(parent)
            except ValueError as exc:
                raise AdapterFetchError(str(exc), transient=False) from exc
            return store.fetch(digest, dest, max_bytes=max_bytes)
        credentials = self.secrets.credentials(content.secret_ref, content.source)
        return fetch_adapter(uri, dest, max_bytes=max_bytes, credentials=credentials)

    def _heal_store(self, fetched: Path, digest: str, files: tuple[str, ...]) -> None:
        """Put a copy fetched from elsewhere into the store, so the next node finds it there."""
        if self.store is None:
            return
        try:
            self.store.put(fetched, digest, files)
        except AdapterFetchError as exc:  # the local copy is fine; the store can wait
            log.warning("adapter %s: could not copy to %s: %s", digest[:12], self.store.url, exc)


def _give_up(content: AdapterContent,
             failures: list[tuple[str, AdapterFetchError | AdapterValidationError]]
             ) -> AdapterFetchError:
    """One error for all attempts: transient if any attempt may work later."""
    transient = any(isinstance(e, AdapterFetchError) and e.transient for _, e in failures)
    reasons = "; ".join(f"{kind}: {getattr(e, 'reason', str(e))}" for kind, e in failures)
    return AdapterFetchError(f"adapter {content.digest[:12]} could not be fetched ({reasons})",
                             transient=transient)
