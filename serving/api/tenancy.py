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

The generation is read as part of the registry's identity (``identity.py``): a registry that
comes back emptied or rolled back is refused like an unreachable one (what was known keeps
answering, the rest is a 503 that says the registry was reset), never believed: otherwise
valid tenants would get 401 and a key revoked after the snapshot would work again. The
refusal lasts until an operator accepts the restore (``accept_restore``, the admin API's
``POST /admin/v1/registry/accept-restore``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

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
from .errors import AuthenticationFailed, ModelNotFound, ServiceUnavailable

log = logging.getLogger(__name__)

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


class Tenancy:
    def __init__(
        self,
        registry: Registry,
        base_model: str,
        *,
        ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.base_model = base_model
        self.ttl = ttl
        self.clock = clock
        # Cache of key hash -> tenant; valid while the registry generation is unchanged and
        # the entry is younger than ttl. Guards nothing shared across threads (one loop).
        self._keys: dict[str, tuple[float, int, Tenant | None]] = {}
        self._generation: tuple[float, int] | None = None
        # The highest registry identity this process trusted, and whether it refuses the
        # registry now (reset or rolled back). Updated only from identities read.
        self._trust = RegistryTrust()
        # Last answers read from the registry, used only while it is unreachable (a registry
        # that is down cannot have changed them). Bounded like the key cache.
        self._known_models: dict[tuple[str, str], AdapterRecord | None] = {}
        self._known_visible: dict[str, list[AdapterRecord]] = {}

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
        seen = await self.registry.identity()
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
        cached = self._keys.get(digest)
        if cached and (cached[1] == gen or gen == -1) and now - cached[0] < self.ttl * (
            1 if gen != -1 else 60
        ):
            tenant = cached[2]
        else:
            if reset is not None:  # the registry answers, but its answer cannot be believed
                raise ServiceUnavailable(RESET_MESSAGE) from reset
            try:
                if gen == -1:
                    # The identity read failed (a blip, or the first command on a connection
                    # to a restarted server): read it again before believing a "no such key"
                    # from a store that may have come back empty.
                    gen = await self._current_generation()
                record = await self.registry.find_key(digest)
                tenant = None
                if record is not None and not record.revoked and keys_match(record.key_hash, digest):
                    tenant = await self.registry.get_tenant(record.tenant)
            except RegistryReset as e:
                raise ServiceUnavailable(RESET_MESSAGE) from e
            except RegistryUnavailable as e:
                raise ServiceUnavailable("The tenant registry is unavailable; retry shortly.") from e
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[digest] = (now, gen, tenant)
        if tenant is None:
            raise AuthenticationFailed(BAD_KEY)
        return tenant

    async def resolve(self, tenant: Tenant, model: str) -> Resolved:
        if model == self.base_model:
            return Resolved(model, None)
        key = (tenant.name, model)
        try:
            await self._current_generation()
            record = await self.registry.get_adapter(tenant.name, model)
            if record is None:
                shared = await self.registry.list_shared_adapters()
                record = next((a for a in shared if a.name == model), None)
        except RegistryUnavailable as e:
            if key not in self._known_models:
                raise ServiceUnavailable(_unavailable(e)) from e
            record = self._known_models[key]
        else:
            if len(self._known_models) > 10_000:
                self._known_models.clear()
            self._known_models[key] = record
        if record is None:
            raise ModelNotFound(model)
        return Resolved(model, record)

    async def visible_adapters(self, tenant: Tenant) -> list[AdapterRecord]:
        try:
            await self._current_generation()
            own = await self.registry.list_adapters(tenant.name)
            shared = await self.registry.list_shared_adapters()
        except RegistryUnavailable as e:
            if tenant.name not in self._known_visible:
                raise ServiceUnavailable(_unavailable(e)) from e
            return list(self._known_visible[tenant.name])
        names = {a.name for a in own}
        visible = sorted(own, key=lambda a: a.name) + sorted(
            (a for a in shared if a.name not in names and a.tenant != tenant.name),
            key=lambda a: a.name,
        )
        if len(self._known_visible) > 10_000:
            self._known_visible.clear()
        self._known_visible[tenant.name] = visible
        return list(visible)


def _unavailable(e: RegistryUnavailable) -> str:
    if isinstance(e, RegistryReset):
        return RESET_MESSAGE
    return "The adapter registry is unavailable; retry shortly."
