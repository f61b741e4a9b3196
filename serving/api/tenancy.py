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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.keys import hash_key, keys_match
from lorafleet.adapters.model import AdapterRecord, Tenant
from lorafleet.adapters.registry import Registry

from .errors import AuthenticationFailed, ModelNotFound, ServiceUnavailable

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
    ) -> None:
        self.registry = registry
        self.base_model = base_model
        self.ttl = ttl
        self.clock = clock
        # Cache of key hash -> tenant; valid while the registry generation is unchanged and
        # the entry is younger than ttl. Guards nothing shared across threads (one loop).
        self._keys: dict[str, tuple[float, int, Tenant | None]] = {}
        self._generation: tuple[float, int] | None = None
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
        now = self.clock()
        if self._generation and now - self._generation[0] < min(self.ttl, 1.0):
            return self._generation[1]
        gen = await self.registry.generation()
        self._generation = (now, gen)
        return gen

    async def authenticate(self, authorization: str | None) -> Tenant:
        token = bearer_token(authorization)
        digest = hash_key(token)
        try:
            gen = await self._current_generation()
        except RegistryUnavailable:
            gen = -1
        now = self.clock()
        cached = self._keys.get(digest)
        if cached and (cached[1] == gen or gen == -1) and now - cached[0] < self.ttl * (
            1 if gen != -1 else 60
        ):
            tenant = cached[2]
        else:
            try:
                record = await self.registry.find_key(digest)
                tenant = None
                if record is not None and not record.revoked and keys_match(record.key_hash, digest):
                    tenant = await self.registry.get_tenant(record.tenant)
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
            record = await self.registry.get_adapter(tenant.name, model)
            if record is None:
                shared = await self.registry.list_shared_adapters()
                record = next((a for a in shared if a.name == model), None)
        except RegistryUnavailable as e:
            if key not in self._known_models:
                raise ServiceUnavailable("The adapter registry is unavailable; retry shortly.") from e
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
            own = await self.registry.list_adapters(tenant.name)
            shared = await self.registry.list_shared_adapters()
        except RegistryUnavailable as e:
            if tenant.name not in self._known_visible:
                raise ServiceUnavailable("The adapter registry is unavailable; retry shortly.") from e
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
