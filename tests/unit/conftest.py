"""Fixtures shared by the unit layer."""

from __future__ import annotations

import pytest
from fakeengine import FakeEngine


@pytest.fixture
async def fake() -> FakeEngine:
    """A started fake engine (tests/support/fakeengine.py): unit tests only."""
    engine = FakeEngine()
    await engine.start()
    return engine
