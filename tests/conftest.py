"""Shared test setup: where models and caches live, quiet offline vLLM, and the one demo
server that the e2e and fault suites share."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# One tiny engine for the whole session, whichever suites use it.
from tinyengine import (  # noqa: F401
    adapter_dirs,
    client,
    engine,
    engine_config,
    services,
    tenants,
    tiny_model,
)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LORAFLEET_DATA_DIR", REPO / ".lorafleet"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Engines built here without VLLMEngine (vLLM's own LLM, stock ops) agree with the others on
# the CPU's vector ISA: serving.engine.vllm_engine.pin_inductor_vec_isa.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", str(DATA_DIR / "vllm-cache"))
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# No per-example deadline for property tests: it is a wall-clock assertion, and on a machine
# busy with engines an example of a correct test takes longer than Hypothesis's 200 ms.
settings.register_profile("lorafleet", deadline=None)
settings.load_profile("lorafleet")


@pytest.fixture(scope="session")
def demo_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, object]]:
    """``lorafleet serve --demo`` (Ray Serve, two SmolLM2 engine replicas) on a real
    ``redis-server`` registry with an append-only file, as a production deployment runs.

    One per session: starting it is the most expensive thing the suite does. The e2e suite
    uses it first; the fault suite (collected after it) then stops Redis and kills an engine
    on it, and each of its tests leaves the server serving again.
    """
    from localserve import Redis, demo_server

    data = tmp_path_factory.mktemp("demo-serve")
    redis = Redis(data, persist=True).start()
    try:
        with demo_server(data, ["--registry", redis.url], timeout_s=900) as server:
            yield server, redis
    finally:
        redis.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Multi-node tests run last: they start and stop whole Ray clusters from this process,
    so nothing else in the session depends on what they leave behind."""
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """No test may leave Flask imported in this process.

    Flask's context-local proxies raise ``RuntimeError`` on ``hasattr``, and vLLM's CPU
    platform scans every module's globals with ``hasattr`` when an engine starts, so one
    Flask import breaks every in-process engine started after it, far from its cause.
    Servers built on Flask (moto) run in their own process (``tests/support/s3server.py``).
    """
    if "flask" in sys.modules:
        pytest.fail(f"{item.nodeid} imported flask into the test process", pytrace=False)
