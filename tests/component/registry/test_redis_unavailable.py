"""RedisRegistry turns a dead server into RegistryUnavailable, quickly and with a clear message."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.model import Quota, Tenant
from lorafleet.adapters.registry import RedisRegistry

pytestmark = pytest.mark.redis


async def test_stopped_server_raises_registry_unavailable(redis_factory: Any) -> None:
    server = redis_factory()
    registry = RedisRegistry(server.url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    try:
        await registry.put_tenant(Tenant("alice", "Alice", Quota(), 1.0))
        server.stop()
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="unreachable") as info:
            await registry.get_tenant("alice")
        assert f"127.0.0.1:{server.port}" in str(info.value)
        with pytest.raises(RegistryUnavailable):
            await registry.put_tenant(Tenant("bob", "Bob", Quota(), 1.0))
        assert time.monotonic() - started < 10
    finally:
        server.stop()
        await registry.close()
