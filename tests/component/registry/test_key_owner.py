"""Who manages a key (`ApiKey.owner`) is stored by both backends and can be handed over.

The operator revokes only keys it owns (issue 19 item 17); a backend that dropped the owner
would make every key look like an admin-API key (never revoked when its Secret goes) or the
reverse.
"""

from __future__ import annotations

import pytest

from lorafleet.adapters.errors import NotFound
from lorafleet.adapters.model import ApiKey, Tenant
from lorafleet.adapters.registry import Registry


async def test_the_owner_is_stored_and_can_be_changed(registry: Registry) -> None:
    await registry.put_tenant(Tenant("alice", "Alice"))
    await registry.add_key(ApiKey("0000000a", "alice", "a" * 64, 1.0))
    await registry.add_key(ApiKey("0000000b", "alice", "b" * 64, 2.0, owner="operator"))
    assert [k.owner for k in await registry.list_keys("alice")] == [None, "operator"]
    found = await registry.find_key("b" * 64)
    assert found is not None and found.owner == "operator"

    generation = await registry.generation()
    await registry.set_key_owner("alice", "0000000a", "operator")
    assert await registry.generation() > generation  # other ingresses re-read the key
    await registry.set_key_owner("alice", "0000000b", None)
    assert [k.owner for k in await registry.list_keys("alice")] == ["operator", None]
    with pytest.raises(NotFound):
        await registry.set_key_owner("bob", "0000000a", "operator")  # not bob's key
    await registry.revoke_key("alice", "0000000a")
    assert [(k.revoked, k.owner) for k in await registry.list_keys("alice")] == [
        (True, "operator"), (False, None)]
