"""The whole server as a user runs it: ``lorafleet serve`` (Ray Serve + vLLM, SmolLM2 demo),
shared with the fault suite (``demo_cluster`` in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest
from localserve import DemoServer


@pytest.fixture(scope="session")
def demo_server(demo_cluster: tuple[DemoServer, object]) -> DemoServer:
    return demo_cluster[0]
