"""How long the ingress trusts what it read about keys and model names (``api.tenancy``).

The rule: a lookup is reused while the registry's generation is unchanged and the answer is
younger than the TTL (5 s); the generation is re-read at most once a second, so a write by
another process (a revoked key) applies within a second and one by this process
(``invalidate``) at once; while the registry is unreachable, answers read before keep
working and nothing new is believed. A real SQLite registry, a counting wrapper and an
injected clock: no server, no sleeping.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import AdapterRecord, ApiKey, Tenant
from lorafleet.adapters.registry import open_registry
from lorafleet.serving.api.errors import AuthenticationFailed, ModelNotFound, ServiceUnavailable
from lorafleet.serving.api.tenancy import Tenancy

BASE = "base-model"


class CountingRegistry:
    """The real registry, counting calls by name; ``down`` makes every call fail as an
    unreachable registry does."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if self.down:
                raise RegistryUnavailable("registry unreachable (test)")
            return await attr(*args, **kwargs)

        return call


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[CountingRegistry]:
    inner = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    await inner.put_tenant(Tenant("alice", "Alice"))
    yield CountingRegistry(inner)
    await inner.close()


async def add_key(registry: CountingRegistry, tenant: str = "alice") -> tuple[str, str]:
    plaintext, key_id = generate_key()
    await registry.inner.add_key(ApiKey(key_id, tenant, hash_key(plaintext), created_at=0.0))
    return plaintext, key_id


def bearer(key: str) -> str:
    return f"Bearer {key}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tenancy(registry: CountingRegistry, clock: Callable[[], float]) -> Tenancy:
    return Tenancy(registry, BASE, clock=clock)  # type: ignore[arg-type]


async def test_a_key_is_read_once_while_its_answer_is_fresh(
    registry: CountingRegistry, tenancy: Tenancy, clock: Clock
) -> None:
    key, _ = await add_key(registry)
    for _ in range(5):
        assert (await tenancy.authenticate(bearer(key))).name == "alice"
        clock.advance(0.5)
    assert registry.calls["find_key"] == 1


async def test_after_the_ttl_the_key_is_read_again(
    registry: CountingRegistry, tenancy: Tenancy, clock: Clock
) -> None:
    key, _ = await add_key(registry)
    await tenancy.authenticate(bearer(key))
    clock.advance(5.1)
    await tenancy.authenticate(bearer(key))
    assert registry.calls["find_key"] == 2


async def test_a_key_revoked_by_another_process_stops_within_a_second(
    registry: CountingRegistry, tenancy: Tenancy, clock: Clock
) -> None:
    key, key_id = await add_key(registry)
    await tenancy.authenticate(bearer(key))
    await registry.inner.revoke_key("alice", key_id)  # another ingress's write
    clock.advance(1.1)
    with pytest.raises(AuthenticationFailed):
        await tenancy.authenticate(bearer(key))


async def test_a_key_revoked_by_this_process_stops_at_once(
    registry: CountingRegistry, tenancy: Tenancy
) -> None:
    key, key_id = await add_key(registry)
    await tenancy.authenticate(bearer(key))
    await registry.inner.revoke_key("alice", key_id)
    tenancy.invalidate()
    with pytest.raises(AuthenticationFailed):
        await tenancy.authenticate(bearer(key))


async def test_an_unknown_key_is_remembered_until_the_registry_changes(
    registry: CountingRegistry, tenancy: Tenancy, clock: Clock
) -> None:
    plaintext, key_id = generate_key()
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            await tenancy.authenticate(bearer(plaintext))
    assert registry.calls["find_key"] == 1  # a flood of bad keys costs one lookup each
    await registry.inner.add_key(ApiKey(key_id, "alice", hash_key(plaintext), created_at=0.0))
    clock.advance(1.1)
    assert (await tenancy.authenticate(bearer(plaintext))).name == "alice"


async def test_an_outage_keeps_known_keys_and_believes_no_new_one(
    registry: CountingRegistry, tenancy: Tenancy, clock: Clock
) -> None:
    key, _ = await add_key(registry)
    other, _ = await add_key(registry)
    await tenancy.authenticate(bearer(key))
    registry.down = True
    clock.advance(2.0)
    assert (await tenancy.authenticate(bearer(key))).name == "alice"
    with pytest.raises(ServiceUnavailable):
        await tenancy.authenticate(bearer(other))  # valid, but never read before the outage


async def test_model_names_answer_from_the_last_read_during_an_outage(
    registry: CountingRegistry, tenancy: Tenancy, clock: Clock
) -> None:
    await registry.inner.put_adapter(AdapterRecord(
        tenant="alice", name="french", source="file:///a", base_model=BASE, digest="ab" * 32,
        rank=8, alpha=16.0, target_modules=("q_proj",), size_bytes=1))
    alice = Tenant("alice", "Alice")
    assert (await tenancy.resolve(alice, "french")).adapter is not None
    with pytest.raises(ModelNotFound):
        await tenancy.resolve(alice, "german")
    assert (await tenancy.resolve(alice, BASE)).adapter is None  # the base model needs no lookup
    registry.down = True
    clock.advance(2.0)
    assert (await tenancy.resolve(alice, "french")).adapter is not None
    with pytest.raises(ServiceUnavailable):
        await tenancy.resolve(alice, "spanish")  # never read: unknown, not "missing"
