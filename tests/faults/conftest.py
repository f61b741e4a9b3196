"""One real server for the fault suites: ``lorafleet serve --demo`` on Ray, two engine
replicas, its registry in a real ``redis-server`` that the tests stop and restart (the
session's ``demo_cluster``, shared with the e2e suite, which runs first).

Redis runs with an append-only file (fsync always) in the test's directory, so a restart on
the same port brings back everything the server wrote, as a production Redis with
persistence would. At most one server runs at a time (the machine has two cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from localserve import DATA_DIR, DemoServer, Redis

__all__ = ["DATA_DIR", "Redis", "Server", "fault_server"]


@dataclass
class Server(DemoServer):
    redis: Redis

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def tenant(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


@pytest.fixture(scope="session")
def fault_server(demo_cluster: tuple[DemoServer, Redis]) -> Server:
    s, redis = demo_cluster
    return Server(s.base_url, s.keys, s.admin_key, s.data_dir, s.log, s.pid, redis)
