"""Fixtures shared by the unit layer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fakeengine import FakeEngine
from tinyengine import api_services, asgi_client

from lorafleet.serving.api.app import build_app
from lorafleet.serving.api.services import ApiServices
from lorafleet.serving.config import EngineConfig


@pytest.fixture
async def fake() -> FakeEngine:
    """A started fake engine (tests/support/fakeengine.py): unit tests only."""
    engine = FakeEngine()
    await engine.start()
    return engine


@pytest.fixture
async def services(engine_config: EngineConfig, fake: FakeEngine,
                   tmp_path: Path) -> AsyncIterator[ApiServices]:
    """The real API services on the fake engine (the tiny model's tokenizer, SQLite registry)."""
    s = api_services(engine_config, fake, tmp_path)
    yield s
    await s.registry.close()


@pytest.fixture
async def api(services: ApiServices) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the real app built on `services`; admin calls take tinyengine.ADMIN."""
    async with asgi_client(build_app(services)) as c:
        yield c
