"""Who is calling and what they may use: API keys to tenants, model names to adapters.

Boundary: reads the registry, never writes it. A tenant sees the base model, its own
adapters and shared adapters; another tenant's adapter answers exactly like a missing one
(``ModelNotFound``), so its existence cannot be inferred. Keys are looked up by their
sha256 (keys are random and high-entropy), and the stored hash is compared in constant time.

Lookups are cached for ``ttl`` seconds keyed by the registry's ``generation()`` (itself
re-read at most once a second), so a registry write by another process (a revoked key, a
deleted adapter) takes effect within a second, one by this process at once, and a registry
that is briefly unreachable does not fail requests it already knows how to answer: keys,
model names and model lists seen before the outage keep their last answer until it ends.
A lookup that fails or runs out its deadline while the registry's identity still answers is
the same outage for that key or name, and is answered the same way.

Bounds, and why (``TenancySettings``):

- The stale window is ``stale_s`` (a minute) counted from when a key was last read: a key
  revoked while this process cannot reach the registry stops working at most that long after
  its last successful read, however long the outage lasts.
- Keys the registry does not know (or knows revoked) go to a separate, bounded negative cache:
  a flood of bogus keys evicts only other bogus keys, never a tenant's good key (which would
  turn the next registry blip into a 503 for that tenant). Model names likewise: names found
  and names known missing are kept apart, so a tenant asking for 10,000 made-up names does
  not make the ingress forget another tenant's adapters.
- Every registry call goes through a circuit breaker (``breaker.py``) and a deadline
  (``lookup_timeout_s``): a registry whose packets are dropped costs one request at most that
  deadline, then requests answer from the caches (or a fast 503) for ``retry_after_s`` until
  one probe gets through. The identity read is shared by the requests that need it at once.

The generation is read as part of the registry's identity (``identity.py``): a registry that
comes back emptied or rolled back is refused like an unreachable one (what was known keeps
answering, the rest is a 503 that says the registry was reset), never believed: otherwise
valid tenants would get 401 and a key revoked after the snapshot would work again. The
refusal lasts until an operator accepts the restore (``accept_restore``, the admin API's
``POST /admin/v1/registry/accept-restore``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.keys import hash_key, keys_match
from lorafleet.adapters.model import AdapterRecord, Tenant
from lorafleet.adapters.registry import Registry
from lorafleet.adapters.registry.identity import (
    RESET_MESSAGE,
    RegistryIdentity,
    RegistryReset,
    RegistryTrust,
    decide_registry_trust,
)

from ..metrics import ServingMetrics
from .breaker import CircuitBreaker
from .errors import AuthenticationFailed, ModelNotFound, ServiceUnavailable

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
BAD_KEY = "Incorrect API key provided."


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(NO_KEY)
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed(NO_KEY)
    return token


@dataclass(frozen=True)
class Resolved:
    """What a request's ``model`` names: the base model (adapter None) or an adapter."""

    model: str
    adapter: AdapterRecord | None


class TenancySettings(BaseModel):
    """How long lookups are reused and how the ingress behaves when the registry hangs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ttl_s: float = Field(default=5.0, gt=0, description="A key or name lookup is reused this long "
                         "while the registry's generation is unchanged.")
    stale_s: float = Field(default=60.0, gt=0, description="While the registry is unreachable or "
                           "refused, a key read at most this long ago keeps its answer: the bound "
                           "on how long a key revoked during an outage keeps working.")
    lookup_timeout_s: float = Field(default=1.0, gt=0, description="Deadline of one registry call "
                                    "made for a request (normally about a millisecond).")
    retry_after_s: float = Field(default=2.0, ge=0, description="After a registry call failed or "
                                 "ran out its deadline, answer from the caches (or 503) this long "
                                 "before one call probes the registry again.")
    max_keys: int = Field(default=100_000, ge=1, description="Valid keys remembered (least "
                          "recently used dropped first).")
    max_unknown_keys: int = Field(default=10_000, ge=1, description="Unknown or revoked keys "
                                  "remembered, apart from the valid ones.")
    max_names: int = Field(default=100_000, ge=1, description="Model names remembered (found and "
                           "missing ones apart, each this many).")


class _Bounded(Generic[K, V]):
    """A dict of at most ``capacity`` entries that drops the least recently used one."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V, *, instead_of: _Bounded[K, Any] | None = None) -> None:
        """Remember `value`; `instead_of` (the cache of the opposite answer) forgets `key`, so
        a key is found in at most one of the two."""
        if instead_of is not None:
            instead_of.pop(key)
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items


@dataclass(frozen=True)
class _KeyEntry:
    read_at: float
    generation: int
    tenant: Tenant | None


BREAKER_OPEN = "registry calls paused after a failure (circuit breaker open)"


class Tenancy:
    def __init__(
        self,
        registry: Registry,
        base_model: str,
        *,
        settings: TenancySettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.base_model = base_model
        self.settings = settings or TenancySettings()
        self.ttl = self.settings.ttl_s
        self.clock = clock
        # Key hash -> what the registry said, read at a generation; valid keys and unknown
        # ones apart (module doc). Guards nothing shared across threads (one event loop).
        self._keys: _Bounded[str, _KeyEntry] = _Bounded(self.settings.max_keys)
        self._unknown_keys: _Bounded[str, _KeyEntry] = _Bounded(self.settings.max_unknown_keys)
        self._generation: tuple[float, int] | None = None
        self._identity_read: asyncio.Task[RegistryIdentity] | None = None
        self._breaker = CircuitBreaker(self.settings.retry_after_s)
        # The highest registry identity this process trusted, and whether it refuses the
        # registry now (reset or rolled back). Updated only from identities read.
        self._trust = RegistryTrust()
        # Last answers read from the registry, used only while it is unreachable (a registry
        # that is down cannot have changed them). Found and missing names apart.
        self._known_models: _Bounded[tuple[str, str], AdapterRecord] = _Bounded(
            self.settings.max_names)
        self._missing_models: _Bounded[tuple[str, str], bool] = _Bounded(self.settings.max_names)
        self._known_visible: _Bounded[str, list[AdapterRecord]] = _Bounded(self.settings.max_names)

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        """One registry call through the breaker, bounded by ``lookup_timeout_s``; raises
        ``RegistryUnavailable`` at once while the breaker is open."""
        if not self._breaker.allow(self.clock()):
            raise RegistryUnavailable(BREAKER_OPEN)
        try:
            result = await asyncio.wait_for(make(), self.settings.lookup_timeout_s)
        except (RegistryUnavailable, TimeoutError) as e:
            self._breaker.failure(self.clock(), slow=isinstance(e, TimeoutError))
            if isinstance(e, RegistryUnavailable):
                raise
            raise RegistryUnavailable(
                f"the registry did not answer within {self.settings.lookup_timeout_s:g} s") from e
        except BaseException:
            self._breaker.abandon()
            raise
        self._breaker.success()
        return result

    async def _read_identity(self) -> RegistryIdentity:
        """The registry's identity; concurrent callers share one read while the breaker is
        closed."""
        task = self._identity_read
        if task is not None and not task.done() and not self._breaker.closed:
            # That read is the breaker's probe of a registry that stopped answering: only
            # the request that made it waits for it.
            raise RegistryUnavailable(BREAKER_OPEN)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._call(self.registry.identity))
            # Retrieved here so that a read nobody awaits any more logs nothing.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._identity_read = task
        return await asyncio.shield(task)

    def invalidate(self) -> None:
        """Re-read the generation on the next request (called when this process writes).

        Cached keys are kept: they carry the generation they were read at, and every write
        bumps it, so a key revoked here is re-read at once. Dropping them would make a
        registry outage forget every key as soon as an admin call came in.
        """
        self._generation = None

    async def _current_generation(self) -> int:
        """The registry's generation, re-read at most once a second; raises ``RegistryReset``
        while the registry is refused and ``RegistryUnavailable`` while it is unreachable."""
        now = self.clock()
        if self._generation and now - self._generation[0] < min(self.ttl, 1.0):
            if not self._trust.trusted:
                raise RegistryReset(self._trust)
            return self._generation[1]
        seen = await self._read_identity()
        self._generation = (now, seen.generation)
        self._set_trust(decide_registry_trust(self._trust, seen))
        if not self._trust.trusted:
            raise RegistryReset(self._trust)
        return seen.generation

    def _set_trust(self, trust: RegistryTrust) -> None:
        before, self._trust = self._trust, trust
        if before.trusted != trust.trusted:
            if trust.refused is not None:
                log.error("registry %s: it was %s (known %s, now %s); serving what this process "
                          "knew until a restore is accepted", getattr(self.registry, "url", ""),
                          "emptied or replaced" if trust.refused == "reset" else "rolled back",
                          trust.known, trust.seen)
            else:
                log.warning("registry trusted again: %s", trust.known)
        if self.metrics is not None:
            self.metrics.registry_refused.set(0 if trust.trusted else 1)

    @property
    def trust(self) -> RegistryTrust:
        return self._trust

    async def refresh_trust(self) -> RegistryTrust:
        """Read the registry's identity now; a registry that cannot be reached leaves the
        state as it was (an outage is not a reset)."""
        self._generation = None
        with contextlib.suppress(RegistryUnavailable):
            await self._current_generation()
        return self._trust

    async def check_writable(self) -> None:
        """Refuse admin writes into a registry this process refuses (503): whatever they
        write would be lost again at ``accept-restore``, or worse, mixed into the wrong store."""
        if not (await self.refresh_trust()).trusted:
            raise ServiceUnavailable(RESET_MESSAGE)

    async def accept_restore(self) -> RegistryIdentity:
        """An operator's decision: the registry as it is now is the truth. It gets a new id
        that supersedes the old ones, which every other ingress adopts on its next read."""
        known = self._trust.known
        supersede = frozenset([known.registry_id]) if known and known.registry_id else frozenset()
        identity = await self.registry.accept_restore(supersede)
        self._generation = None
        self._set_trust(RegistryTrust(known=identity, seen=identity))
        log.warning("registry restore accepted: now %s", identity)
        return identity

    async def authenticate(self, authorization: str | None) -> Tenant:
        token = bearer_token(authorization)
        digest = hash_key(token)
        reset: RegistryReset | None = None
        try:
            gen = await self._current_generation()
        except RegistryReset as e:
            gen, reset = -1, e
        except RegistryUnavailable:
            gen = -1
        now = self.clock()
        cached = self._keys.get(digest) or self._unknown_keys.get(digest)
        if cached is not None and self._usable(cached, gen, now):
            tenant = cached.tenant
        else:
            if reset is not None:  # the registry answers, but its answer cannot be believed
                raise ServiceUnavailable(RESET_MESSAGE) from reset
            try:
                if gen == -1:
                    # The identity read failed (a blip, or the first command on a connection
                    # to a restarted server): read it again before believing a "no such key"
                    # from a store that may have come back empty.
                    gen = await self._current_generation()
                record = await self._call(lambda: self.registry.find_key(digest))
                tenant = None
                if record is not None and not record.revoked and keys_match(record.key_hash, digest):
                    name = record.tenant
                    tenant = await self._call(lambda: self.registry.get_tenant(name))
            except RegistryReset as e:
                raise ServiceUnavailable(RESET_MESSAGE) from e
            except RegistryUnavailable as e:
                # The identity answered but the lookup did not (or ran out its deadline):
                # for this key that is an outage, and an outage keeps a recent answer.
                if cached is None or not self._usable(cached, -1, now):
                    raise self._unavailable("The tenant registry is unavailable; retry shortly.") from e
                return self._tenant_or_401(cached.tenant)
            entry = _KeyEntry(now, gen, tenant)
            if tenant is not None:
                self._keys.put(digest, entry, instead_of=self._unknown_keys)
            else:
                self._unknown_keys.put(digest, entry, instead_of=self._keys)
        return self._tenant_or_401(tenant)

    @staticmethod
    def _tenant_or_401(tenant: Tenant | None) -> Tenant:
        if tenant is None:
            raise AuthenticationFailed(BAD_KEY)
        return tenant

    def _unavailable(self, e: RegistryUnavailable | str) -> ServiceUnavailable:
        if isinstance(e, RegistryReset):  # waiting does not help: an operator must decide
            return ServiceUnavailable(RESET_MESSAGE)
        message = e if isinstance(e, str) else "The adapter registry is unavailable; retry shortly."
        return registry_unavailable(message, self.settings.retry_after_s)

    def _usable(self, entry: _KeyEntry, gen: int, now: float) -> bool:
        """A cached key answer holds while the generation is unchanged (for ``ttl_s``), and
        while the registry cannot be read or believed (for ``stale_s`` after it was read)."""
        age = now - entry.read_at
        if gen == -1:
            return age < self.settings.stale_s
        return entry.generation == gen and age < self.settings.ttl_s

    async def resolve(self, tenant: Tenant, model: str) -> Resolved:
        if model == self.base_model:
            return Resolved(model, None)
        key = (tenant.name, model)
        record: AdapterRecord | None
        try:
            await self._current_generation()
            record = await self._call(lambda: self.registry.get_adapter(tenant.name, model))
            if record is None:
                shared = await self._call(self.registry.list_shared_adapters)
                record = next((a for a in shared if a.name == model), None)
        except RegistryUnavailable as e:
            record = self._known_models.get(key)
            if record is None and key not in self._missing_models:
                raise self._unavailable(e) from e
        else:
            if record is None:
                self._missing_models.put(key, True, instead_of=self._known_models)
            else:
                self._known_models.put(key, record, instead_of=self._missing_models)
        if record is None:
            raise ModelNotFound(model)
        return Resolved(model, record)

    async def visible_adapters(self, tenant: Tenant) -> list[AdapterRecord]:
        try:
            await self._current_generation()
            own = await self._call(lambda: self.registry.list_adapters(tenant.name))
            shared = await self._call(self.registry.list_shared_adapters)
        except RegistryUnavailable as e:
            known = self._known_visible.get(tenant.name)
            if known is None:
                raise self._unavailable(e) from e
            return list(known)
        names = {a.name for a in own}
        visible = sorted(own, key=lambda a: a.name) + sorted(
            (a for a in shared if a.name not in names and a.tenant != tenant.name),
            key=lambda a: a.name,
        )
        self._known_visible.put(tenant.name, visible)
        return list(visible)


def registry_unavailable(message: str, retry_after_s: float) -> ServiceUnavailable:
    """The 503 for a registry that cannot be reached, with ``Retry-After``: the breaker lets
    the next registry call through after ``retry_after_s``, so a client that waits that long
    is not refused by the breaker again."""
    return ServiceUnavailable(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})
