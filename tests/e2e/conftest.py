"""The whole server as a user runs it: ``lorafleet serve`` (Ray Serve + vLLM, SmolLM2 demo)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from localserve import DemoServer
from localserve import demo_server as start_demo_server


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    with start_demo_server(tmp_path_factory.mktemp("serve-data")) as server:
        yield server
