"""An engine core that dies mid-stream surfaces as our ``EngineDead`` (503), not vLLM's error.

vLLM's ``AsyncLLM`` is replaced by a stand-in that yields one output and then raises
``EngineDeadError``, as it does when the ``VLLM::EngineCore`` process is killed; its abort
raises too. The server-level version is ``test_server_faults.py::
test_engine_replica_killed_mid_stream`` (a real kill under Ray Serve).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from lorafleet.serving.config import EngineConfig
from lorafleet.serving.engine.errors import EngineDead, EngineError
from lorafleet.serving.engine.protocol import GenerateRequest, SamplingOptions
from lorafleet.serving.engine.vllm_engine import VLLMEngine

pytestmark = pytest.mark.vllm  # imports vLLM (no engine is started)


class DyingLLM:
    def __init__(self) -> None:
        self.aborts = 0
        self.errored = False  # as AsyncLLM's, once its engine core is gone

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        from vllm.v1.engine.exceptions import EngineDeadError

        yield SimpleNamespace(finished=False, outputs=[SimpleNamespace(
            text="a", token_ids=[1], finish_reason=None, logprobs=None)])
        self.errored = True
        raise EngineDeadError()

    async def abort(self, request_id: str) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        self.aborts += 1
        raise EngineDeadError()


async def test_engine_core_death_is_engine_dead() -> None:
    engine = VLLMEngine(EngineConfig(model_dir="/nonexistent", served_model_name="m"), "r-1")
    engine._llm = DyingLLM()
    got = []
    with pytest.raises(EngineDead) as info:
        async for delta in engine.generate(GenerateRequest("req-1", (1, 2), SamplingOptions(4))):
            got.append(delta.text)
    assert got == ["a"]
    assert isinstance(info.value, EngineError) and "r-1" in str(info.value)
    assert engine._llm.aborts == 1  # tried, and its own failure did not mask the first error
    stats = await engine.stats()
    assert stats.in_flight == 0 and not stats.healthy  # /health stops counting this replica
