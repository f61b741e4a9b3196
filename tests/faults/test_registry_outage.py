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
from switchable import BASE, offline_world

from lorafleet.serving.api.errors import AuthenticationFailed, ModelNotFound, ServiceUnavailable


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    async with offline_world(tmp_path / "r.db") as w:
        yield w.registry, w.tenancy, w.clock, w.keys["alice"], w.key_ids["alice"]


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
