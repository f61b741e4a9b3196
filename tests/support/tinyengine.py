"""A real vLLM engine on the tiny random Llama, the real API app, a SQLite registry.

One engine per test session (it takes ~10 s to start and ~0.7 GB): ``tests/conftest.py``
registers these fixtures once for every layer that drives the in-process app (component
serving, security), so they all share it. Each test gets a fresh app and registry.
Adapters are random but valid PEFT LoRAs of different ranks and targets.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from adapterfiles import node_files
from fastapi import FastAPI

from lorafleet.serving.api.app import build_app
from lorafleet.serving.api.services import ApiServices
from lorafleet.serving.assemble import make_services
from lorafleet.serving.config import EngineConfig
from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME, make_random_adapter, make_tiny_model
from lorafleet.serving.engine.client import LocalEngineClient
from lorafleet.serving.engine.protocol import Engine
from lorafleet.serving.engine.vllm_engine import VLLMEngine

DATA_DIR = Path(os.environ.get("LORAFLEET_DATA_DIR", Path(__file__).resolve().parents[2] / ".lorafleet"))
ADMIN_KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

# name -> (rank, target modules): different ranks and targets in one batch.
ADAPTERS = {
    "ad-r4-qv": (4, ["q_proj", "v_proj"]),
    "ad-r8-all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "ad-r16-mlp": (16, ["gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return make_tiny_model(DATA_DIR / "models" / TINY_MODEL_NAME)


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_random_adapter(
            tiny_model, root / name, rank=r, target_modules=t, seed=i + 1,
            base_model_name=TINY_MODEL_NAME,
        )
        for i, (name, (r, t)) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="session")
def engine_config(tiny_model: Path) -> EngineConfig:
    return EngineConfig(
        model_dir=str(tiny_model),
        served_model_name=TINY_MODEL_NAME,
        dtype="float32",
        max_model_len=512,
        max_loras=4,
        max_lora_rank=16,
        max_cpu_loras=8,
        kv_cache_bytes=64 * 2**20,
    )


@pytest.fixture(scope="session")
async def engine(engine_config: EngineConfig,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VLLMEngine]:
    # The replica's own data directory, not the ingress's: adapters come by content.
    e = VLLMEngine(engine_config, replica_id="replica-0",
                   adapter_files=node_files(engine_config, tmp_path_factory.mktemp("node")))
    await e.start()
    yield e
    await e.shutdown()


def api_services(config: EngineConfig, engine: Engine, data_dir: Path) -> ApiServices:
    """The real API services on `engine`: a SQLite registry in `data_dir`, admin key ADMIN_KEY."""
    return make_services(engine_config=config, engines=LocalEngineClient([engine]),
                         registry_url=f"sqlite:///{data_dir / 'registry.db'}", data_dir=data_dir,
                         admin_key=ADMIN_KEY)


def asgi_client(app: FastAPI, timeout: float = 30.0) -> httpx.AsyncClient:
    """A client of `app` in process (no server, no socket)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lorafleet",
                             timeout=timeout)


@pytest.fixture
async def services(engine: VLLMEngine, engine_config: EngineConfig, tmp_path: Path):
    for adapter_id in (await engine.stats()).resident_adapters:
        await engine.unload_adapter(adapter_id)
    s = api_services(engine_config, engine, tmp_path)
    yield s
    await s.registry.close()


@pytest.fixture
async def client(services) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(build_app(services), timeout=120) as c:
        yield c


def admin(c: httpx.AsyncClient):
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def tenants(client: httpx.AsyncClient, adapter_dirs: dict[str, Path]) -> dict[str, str]:
    """alice owns the three adapters; bob owns none. Returns tenant -> API key."""
    keys = {}
    for t in ("alice", "bob"):
        r = await client.post("/admin/v1/tenants", json={"name": t}, headers=admin(client))
        assert r.status_code == 201, r.text
        r = await client.post(f"/admin/v1/tenants/{t}/keys", json={}, headers=admin(client))
        assert r.status_code == 201, r.text
        keys[t] = r.json()["key"]
    for name, path in adapter_dirs.items():
        r = await client.post(
            "/admin/v1/tenants/alice/adapters",
            json={"name": name, "source": str(path)},
            headers=admin(client),
        )
        assert r.status_code == 201, r.text
    return keys
