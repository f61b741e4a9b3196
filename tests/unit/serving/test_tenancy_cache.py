"""How long the ingress trusts a key it has read (``api.tenancy``).

The rule: a lookup is reused while the registry's generation is unchanged and the answer is
younger than the TTL (5 s); the generation is re-read at most once a second, so a write by
another process (a revoked key, a new one) applies within a second. A real SQLite registry
whose key lookups are counted and an injected clock: no server, no sleeping. Writes by this
process and registry outages: tests/faults/test_registry_outage.py.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import ApiKey, Tenant
from lorafleet.adapters.registry import open_registry
from lorafleet.serving.api.errors import AuthenticationFailed, ServiceUnavailable
from lorafleet.serving.api.tenancy import Tenancy

pytestmark = pytest.mark.middle

BASE = "base-model"


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """The real SQLite registry; ``registry.lookups`` counts key lookups."""
    reg = open_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    await reg.put_tenant(Tenant("alice", "Alice"))
    find_key = reg.find_key
    lookups: list[str] = []

    async def counted(key_hash: str) -> Any:
        lookups.append(key_hash)
        return await find_key(key_hash)

    monkeypatch.setattr(reg, "find_key", counted)
    monkeypatch.setattr(reg, "lookups", lookups, raising=False)
    yield reg
    await reg.close()


async def add_key(registry: Any, tenant: str = "alice") -> tuple[str, str]:
    plaintext, key_id = generate_key()
    await registry.add_key(ApiKey(key_id, tenant, hash_key(plaintext), created_at=0.0))
    return plaintext, key_id


def bearer(key: str) -> str:
    return f"Bearer {key}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tenancy(registry: Any, clock: Callable[[], float]) -> Tenancy:
    return Tenancy(registry, BASE, clock=clock)


async def test_a_key_is_read_once_while_fresh_and_again_after_the_ttl(
    registry: Any, tenancy: Tenancy, clock: Clock
) -> None:
    key, _ = await add_key(registry)
    for _ in range(5):
        assert (await tenancy.authenticate(bearer(key))).name == "alice"
        clock.now += 0.5
    assert len(registry.lookups) == 1
    clock.now += 5.0  # TTL 5 s since the read
    await tenancy.authenticate(bearer(key))
    assert len(registry.lookups) == 2


async def test_a_key_revoked_by_another_process_stops_within_a_second(
    registry: Any, tenancy: Tenancy, clock: Clock
) -> None:
    key, key_id = await add_key(registry)
    await tenancy.authenticate(bearer(key))
    await registry.revoke_key("alice", key_id)  # another ingress's write
    clock.now += 1.1
    with pytest.raises(AuthenticationFailed):
        await tenancy.authenticate(bearer(key))


async def test_an_unknown_key_is_remembered_until_the_registry_changes(
    registry: Any, tenancy: Tenancy, clock: Clock
) -> None:
    plaintext, key_id = generate_key()
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            await tenancy.authenticate(bearer(plaintext))
    assert len(registry.lookups) == 1  # a flood of bad keys costs one lookup each
    await registry.add_key(ApiKey(key_id, "alice", hash_key(plaintext), created_at=0.0))
    clock.now += 1.1
    assert (await tenancy.authenticate(bearer(plaintext))).name == "alice"


async def test_every_503_of_an_unreachable_registry_says_when_to_retry(
    registry: Any, tenancy: Tenancy, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown key, an unknown adapter and the model list, each refused while the registry
    cannot be reached: a 503 whose ``Retry-After`` is the breaker's wait, never a bare one."""
    key, _ = await add_key(registry)
    alice = await tenancy.authenticate(bearer(key))

    async def down(*_: Any, **__: Any) -> Any:
        raise RegistryUnavailable("connection refused")

    for name in ("find_key", "get_adapter", "list_adapters", "list_shared_adapters",
                 "get_tenant", "generation", "identity"):
        if hasattr(registry, name):
            monkeypatch.setattr(registry, name, down)
    clock.now += 10.0
    unknown, _ = generate_key()
    calls = [lambda: tenancy.authenticate(bearer(unknown)),
             lambda: tenancy.resolve(alice, "never-seen"),
             lambda: tenancy.visible_adapters(alice)]
    for call in calls:
        with pytest.raises(ServiceUnavailable) as refused:
            await call()
        retry_after = refused.value.response().headers.get("Retry-After")
        assert retry_after == str(math.ceil(tenancy.settings.retry_after_s)), retry_after


async def test_a_known_key_and_adapter_keep_working_while_lookups_run_out_their_deadline(
    registry: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry that answers its identity but whose lookups miss the deadline (a loaded
    Redis, a busy ingress loop) is an outage for those lookups: a key read within ``stale_s``
    and an adapter resolved before keep their answer; a key never seen is a 503."""
    import asyncio

    from lorafleet.adapters.model import AdapterRecord
    from lorafleet.serving.api.tenancy import TenancySettings

    tenancy = Tenancy(registry, BASE, clock=clock,
                      settings=TenancySettings(lookup_timeout_s=0.05, retry_after_s=0.0))
    key, _ = await add_key(registry)
    await registry.put_adapter(AdapterRecord(
        tenant="alice", name="french", source="file:///x", base_model=BASE, digest="0" * 64,
        rank=8, alpha=16.0, target_modules=("q_proj",), size_bytes=1))
    alice = await tenancy.authenticate(bearer(key))
    assert (await tenancy.resolve(alice, "french")).adapter is not None

    async def slow(*_: Any, **__: Any) -> Any:
        await asyncio.sleep(10)

    for name in ("find_key", "get_tenant", "get_adapter", "list_shared_adapters"):
        monkeypatch.setattr(registry, name, slow)
    clock.now += tenancy.settings.ttl_s + 1  # past the TTL: the key is read again
    assert (await tenancy.authenticate(bearer(key))).name == "alice"
    assert (await tenancy.resolve(alice, "french")).model == "french"
    unknown, _ = generate_key()
    with pytest.raises(ServiceUnavailable):
        await tenancy.authenticate(bearer(unknown))
    clock.now += tenancy.settings.stale_s  # the stale window bounds it, as in an outage
    with pytest.raises(ServiceUnavailable):
        await tenancy.authenticate(bearer(key))
