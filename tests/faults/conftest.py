"""One real server for the fault suites: ``lorafleet serve --demo`` on Ray, two engine
replicas, its registry in a real ``redis-server`` that the tests stop and restart.

Redis runs with an append-only file (fsync always) in the test's directory, so a restart on
the same port brings back everything the server wrote, as a production Redis with
persistence would. At most one server runs at a time (the machine has two cores).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from localserve import DATA_DIR, DemoServer, Redis, demo_server

__all__ = ["DATA_DIR", "Redis", "Server", "fault_server"]


@dataclass
class Server(DemoServer):
    redis: Redis

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def tenant(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("fault-serve")
    redis = Redis(data, persist=True).start()
    try:
        with demo_server(data, ["--registry", redis.url], timeout_s=480) as s:
            yield Server(s.base_url, s.keys, s.admin_key, s.data_dir, s.log, s.pid, redis)
    finally:
        redis.stop()
