"""How long and how much the ingress's tenancy caches remember (no server, no engine).

Two bounds a hostile or unlucky world tests: a key revoked while the registry is unreachable
stops working a minute after it was last read (the threat model's figure), however long the
outage; and a flood of bogus keys or made-up model names never evicts what the ingress knows
about real tenants, which it needs the moment the registry goes away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from switchable import offline_world

from lorafleet.serving.api.errors import AuthenticationFailed, ModelNotFound, ServiceUnavailable

FLOOD = 10_001  # one more than the old single cache held before it was cleared


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    async with offline_world(tmp_path / "r.db", ("alice", "bob")) as w:
        yield w.registry, w.tenancy, w.clock, w.keys


async def test_a_known_key_stops_working_a_minute_after_its_last_read_during_an_outage(
    world: Any,
) -> None:
    reg, tenancy, clock, keys = world
    assert (await tenancy.authenticate(keys["alice"])).name == "alice"
    reg.down = True  # the key may have been revoked in here, where this process cannot see
    clock.now += 59
    assert (await tenancy.authenticate(keys["alice"])).name == "alice"
    clock.now += 2
    with pytest.raises(ServiceUnavailable):
        await tenancy.authenticate(keys["alice"])
    reg.down = False
    clock.now += 3  # past the breaker's pause after the failed read
    assert (await tenancy.authenticate(keys["alice"])).name == "alice"


async def test_bogus_keys_do_not_evict_good_ones(world: Any) -> None:
    reg, tenancy, clock, keys = world
    assert (await tenancy.authenticate(keys["alice"])).name == "alice"
    for i in range(FLOOD):
        with pytest.raises(AuthenticationFailed):
            await tenancy.authenticate(f"Bearer lf_{i:08x}_{'B' * 32}")
    reg.down = True
    clock.now += 2
    assert (await tenancy.authenticate(keys["alice"])).name == "alice"
    # A bogus key seen before the outage is still known to be bogus: 401, not 503.
    with pytest.raises(AuthenticationFailed):
        await tenancy.authenticate(f"Bearer lf_{FLOOD - 1:08x}_{'B' * 32}")


async def test_made_up_model_names_do_not_evict_another_tenants_adapters(world: Any) -> None:
    reg, tenancy, clock, keys = world
    alice = await tenancy.authenticate(keys["alice"])
    bob = await tenancy.authenticate(keys["bob"])
    assert (await tenancy.resolve(alice, "pirate")).adapter is not None
    for i in range(FLOOD):
        with pytest.raises(ModelNotFound):
            await tenancy.resolve(bob, f"made-up-{i}")
    reg.down = True
    clock.now += 2
    assert (await tenancy.resolve(alice, "pirate")).adapter is not None
