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

from lorafleet.adapters.keys import generate_key
from lorafleet.operator.emulation import run_operator
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
    from lorafleet.operator.bench import tiny_serving
    from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME, make_random_adapter

    async with tiny_serving(DATA_DIR, tmp_path, ADMIN_KEY, max_cpu_loras=4,
                            replicas_ttl=0) as world:
        engine, services, api = world.engine, world.services, world.api
        good, evil = (make_random_adapter(world.model_dir, tmp_path / name, rank=4,
                                          target_modules=["q_proj", "v_proj"], seed=seed,
                                          base_model_name=TINY_MODEL_NAME)
                      for seed, name in ((1, "good"), (2, "evil")))
        (evil / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle
        key, _ = generate_key()
        async with run_operator(world.serving, RegistryTenantStore(services.registry)) as cluster:
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


async def _eq(awaitable: Any, expected: Any) -> bool:
    return await awaitable == expected
