"""The operator against the real LoRAFleet app: a real vLLM engine (tiny Llama), the real admin
and OpenAI routes, and the registry serving reads (the operator writes tenant keys into it).

One test walks the whole story, so the engine starts once (~10 s):
Tenant + key Secret -> the key works; LoRAAdapter -> Ready -> the tenant chats with it; a pickle
adapter -> Failed, nothing loaded; delete the adapter -> 404 and the registry forgets it;
delete the Secret -> the key stops working.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapterfiles import node_files

from lorafleet.adapters.keys import generate_key
from lorafleet.operator.emulation import run_operator
from lorafleet.operator.serving_client import ServingClient
from lorafleet.operator.tenant_store import RegistryTenantStore

from .conftest import ADAPTERS, SECRETS, TENANTS, secret

# heavy: 45 s (a real lorafleet serve driven by the operator).
pytestmark = [pytest.mark.vllm, pytest.mark.heavy]

DATA_DIR = Path(os.environ.get("LORAFLEET_DATA_DIR",
                               Path(__file__).resolve().parents[3] / ".lorafleet"))
ADMIN_KEY = "operator-test-admin-key"


def adapter_cr(name: str, uri: str, base_model: str) -> dict[str, Any]:
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"tenant": "carol", "baseModel": base_model, "source": {"uri": uri}}}


async def chat(client: httpx.AsyncClient, key: str, model: str) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}],
              "max_tokens": 4, "temperature": 0})


async def test_operator_drives_the_real_server(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from lorafleet.serving.api.app import build_app
    from lorafleet.serving.assemble import make_services
    from lorafleet.serving.config import EngineConfig
    from lorafleet.serving.demo.basemodel import (
        TINY_MODEL_NAME,
        make_random_adapter,
        make_tiny_model,
    )
    from lorafleet.serving.engine.client import LocalEngineClient
    from lorafleet.serving.engine.vllm_engine import VLLMEngine

    model_dir = make_tiny_model(DATA_DIR / "models" / TINY_MODEL_NAME)
    good = make_random_adapter(model_dir, tmp_path / "good", rank=4,
                               target_modules=["q_proj", "v_proj"], seed=1,
                               base_model_name=TINY_MODEL_NAME)
    evil = make_random_adapter(model_dir, tmp_path / "evil", rank=4,
                               target_modules=["q_proj", "v_proj"], seed=2,
                               base_model_name=TINY_MODEL_NAME)
    (evil / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle
    config = EngineConfig(model_dir=str(model_dir), served_model_name=TINY_MODEL_NAME,
                          dtype="float32", max_model_len=512, max_loras=2, max_lora_rank=8,
                          max_cpu_loras=4, kv_cache_bytes=64 * 2**20)
    engine = VLLMEngine(config, replica_id="replica-0",
                        adapter_files=node_files(config, tmp_path / "node"))
    await engine.start()
    services = make_services(engine_config=config, engines=LocalEngineClient([engine]),
                             registry_url=f"sqlite:///{tmp_path / 'registry.db'}",
                             data_dir=tmp_path, admin_key=ADMIN_KEY)
    transport = httpx.ASGITransport(app=build_app(services))
    api = httpx.AsyncClient(transport=transport, base_url="http://lorafleet", timeout=120)
    serving = ServingClient("http://lorafleet", ADMIN_KEY, transport=transport, replicas_ttl=0)
    key, _ = generate_key()
    try:
        async with run_operator(serving, RegistryTenantStore(services.registry)) as cluster:
            await cluster.apply(SECRETS, secret("carol-key", key))
            await cluster.apply(TENANTS, {
                "apiVersion": "lorafleet.io/v1alpha1", "kind": "Tenant",
                "metadata": {"name": "carol"},
                "spec": {"apiKeySecrets": [{"name": "carol-key"}]}})

            async def models_status() -> int:
                r = await api.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
                return r.status_code

            await cluster.wait_for(lambda: _eq(models_status(), 200), what="key works")

            await cluster.apply(ADAPTERS, adapter_cr("good", str(good), TINY_MODEL_NAME))
            await cluster.wait_for(
                lambda: ((cluster.get(ADAPTERS, "good") or {}).get("status", {})
                         .get("phase") == "Ready"), timeout=60, what="Ready")
            status = cluster.get(ADAPTERS, "good")["status"]
            assert status["replicas"] == ["replica-0"]
            assert status["adapterId"] in (await engine.stats()).resident_adapters
            r = await chat(api, key, "good")
            assert r.status_code == 200, r.text

            await cluster.apply(ADAPTERS, adapter_cr("evil", str(evil), TINY_MODEL_NAME))
            await cluster.wait_for(
                lambda: ((cluster.get(ADAPTERS, "evil") or {}).get("status", {})
                         .get("phase") == "Failed"), timeout=30, what="Failed")
            message = cluster.get(ADAPTERS, "evil")["status"]["message"]
            assert "adapter_model.bin" in message or "pickle" in message.lower(), message
            assert await services.registry.get_adapter("carol", "evil") is None
            assert (await chat(api, key, "evil")).status_code == 404

            await cluster.delete(ADAPTERS, "good")
            await cluster.wait_for(lambda: cluster.get(ADAPTERS, "good") is None,
                                   timeout=30, what="deleted")
            assert await services.registry.get_adapter("carol", "good") is None
            assert (await chat(api, key, "good")).status_code == 404
            assert status["adapterId"] not in (await engine.stats()).resident_adapters

            await cluster.delete(SECRETS, "carol-key")
            await cluster.wait_for(lambda: _eq(models_status(), 401), timeout=10,
                                   what="key revoked")
    finally:
        await serving.aclose()
        await api.aclose()
        await services.registry.close()
        await engine.shutdown()


async def _eq(awaitable: Any, expected: Any) -> bool:
    return await awaitable == expected
