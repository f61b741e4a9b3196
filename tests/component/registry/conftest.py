"""Registry backends for the shared suite: SQLite in a temp dir and a real `redis-server`.

The Redis server is started once per session on a free port (no persistence) and killed at the
end; each test gets its own key namespace, so tests never see each other's data.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from localserve import Redis

from lorafleet.adapters.registry import RedisRegistry, Registry, SQLiteRegistry


def start_redis(tmp: Path) -> Redis:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found (Debian: apt-get install -y redis-server)")
    return Redis(tmp).start()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[[], Redis]]:
    """Start private servers (for tests that stop them); all are stopped afterwards."""
    started: list[Redis] = []

    def start() -> Redis:
        started.append(start_redis(tmp_path))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def registry(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Registry]:
    reg: Registry
    if request.param == "sqlite":
        reg = SQLiteRegistry(tmp_path / "registry.db")
    else:
        server: Redis = request.getfixturevalue("redis_server")
        reg = RedisRegistry(server.url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    yield reg
    await reg.close()
