"""The ingress's tenancy layer while the registry is unreachable (no server, no engine).

A registry wrapper that can be switched off stands in for Redis going away; the server-level
version of this test (``test_server_faults.py::test_redis_stopped_and_restarted``) runs the
real thing. What the ingress already knew keeps answering; what it did not know is a 503;
an admin call in the middle of the outage must not make it forget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import AdapterRecord, ApiKey, Tenant
from lorafleet.adapters.registry import SQLiteRegistry
from lorafleet.serving.api.errors import AuthenticationFailed, ModelNotFound, ServiceUnavailable
from lorafleet.serving.api.tenancy import Tenancy

BASE = "base-model"


class Switchable:
    """A registry that raises ``RegistryUnavailable`` from every call while ``down``."""

    def __init__(self, inner: SQLiteRegistry) -> None:
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
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def adapter(tenant: str, name: str) -> AdapterRecord:
    return AdapterRecord(tenant=tenant, name=name, source="/x", base_model=BASE, digest="d" * 64,
                         rank=4, alpha=8.0, target_modules=("q_proj",), size_bytes=1)


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    inner = SQLiteRegistry(str(tmp_path / "r.db"))
    reg = Switchable(inner)
    await inner.put_tenant(Tenant("alice", "Alice"))
    key, key_id = generate_key()
    await inner.add_key(ApiKey(key_id, "alice", hash_key(key), 0.0))
    await inner.put_adapter(adapter("alice", "pirate"))
    clock = Clock()
    tenancy = Tenancy(reg, BASE, clock=clock)  # type: ignore[arg-type]
    yield reg, tenancy, clock, f"Bearer {key}", key_id
    await inner.close()


async def test_what_was_known_keeps_answering_through_an_outage(world: Any) -> None:
    reg, tenancy, clock, auth, _ = world
    alice = await tenancy.authenticate(auth)
    assert (await tenancy.resolve(alice, "pirate")).adapter is not None
    with pytest.raises(ModelNotFound):
        await tenancy.resolve(alice, "french")
    assert [a.name for a in await tenancy.visible_adapters(alice)] == ["pirate"]

    reg.down = True
    clock.now += 30
    tenancy.invalidate()  # an admin call during the outage (it will fail with 503 itself)
    assert (await tenancy.authenticate(auth)).name == "alice"
    assert (await tenancy.resolve(alice, "pirate")).adapter is not None
    assert (await tenancy.resolve(alice, BASE)).adapter is None
    with pytest.raises(ModelNotFound):
        await tenancy.resolve(alice, "french")  # known not to exist: still not found
    assert [a.name for a in await tenancy.visible_adapters(alice)] == ["pirate"]
    # Never seen: cannot be answered, and is not guessed.
    with pytest.raises(ServiceUnavailable):
        await tenancy.authenticate("Bearer lf_00000000_" + "A" * 32)
    with pytest.raises(ServiceUnavailable):
        await tenancy.resolve(alice, "json")


async def test_revocation_by_this_process_still_takes_effect_at_once(world: Any) -> None:
    reg, tenancy, clock, auth, key_id = world
    assert (await tenancy.authenticate(auth)).name == "alice"
    await reg.revoke_key("alice", key_id)
    tenancy.invalidate()
    with pytest.raises(AuthenticationFailed):
        await tenancy.authenticate(auth)
