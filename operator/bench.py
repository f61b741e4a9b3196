"""Benchmark: the operator against the real LoRAFleet app on the tiny model, in the emulator.

    python -m lorafleet.operator.bench [--adapters 1000] [--json out.json]

Prints (and writes as JSON):
- apply -> Ready and apply -> first successful chat request, for one LoRAAdapter with a local
  source (goal: at most 2 s on our CPU machine);
- `--adapters N` LoRAAdapters applied at once (placement `demand`): time until all are Ready,
  and the process's peak RSS (which includes the in-process vLLM engine).

Boundary: a command that prints numbers, not a test. Needs a source checkout, the dev
dependency `kmock` and the `cpu` extra (vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TinyServing", "main", "tiny_serving"]

ADAPTERS = "lorafleet.io/v1alpha1/loraadapters"
TENANTS = "lorafleet.io/v1alpha1/tenants"
SECRETS = "v1/secrets"
ADMIN_KEY = "bench-admin-key"


def _adapter(name: str, uri: str, base_model: str, mode: str = "all") -> dict[str, Any]:
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"tenant": "bench", "baseModel": base_model, "source": {"uri": uri},
                     "placement": {"mode": mode}}}


@dataclass
class TinyServing:
    """The real LoRAFleet app on the tiny model: one in-process vLLM engine (its adapter files
    in its own node directory, as on a cluster), the services, and clients through ASGI."""

    model_dir: Path
    engine: Any
    services: Any
    api: Any
    """An ``httpx.AsyncClient`` on the OpenAI and admin routes."""
    serving: Any
    """The operator's ``ServingClient`` on the same app."""


@asynccontextmanager
async def tiny_serving(data_dir: Path, work: Path, admin_key: str, *, max_cpu_loras: int = 8,
                       replicas_ttl: float = 0.5) -> AsyncIterator[TinyServing]:
    """Start :class:`TinyServing` (registry: SQLite under ``work``) and stop it on exit."""
    import httpx

    from lorafleet.serving.api.app import build_app
    from lorafleet.serving.assemble import make_materializer, make_services
    from lorafleet.serving.config import AdapterFilesConfig, EngineConfig
    from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME, make_tiny_model
    from lorafleet.serving.engine.client import LocalEngineClient
    from lorafleet.serving.engine.vllm_engine import VLLMEngine

    from .serving_client import ServingClient

    model_dir = make_tiny_model(data_dir / "models" / TINY_MODEL_NAME)
    config = EngineConfig(model_dir=str(model_dir), served_model_name=TINY_MODEL_NAME,
                          dtype="float32", max_model_len=512, max_loras=2, max_lora_rank=8,
                          max_cpu_loras=max_cpu_loras, kv_cache_bytes=64 * 2**20)
    node = AdapterFilesConfig(data_dir=str(work / "node"), secrets_dir=str(work / "secrets"))
    engine = VLLMEngine(config, replica_id="replica-0",
                        adapter_files=make_materializer(config, node))
    await engine.start()
    services = make_services(engine_config=config, engines=LocalEngineClient([engine]),
                             registry_url=f"sqlite:///{work / 'registry.db'}", data_dir=work,
                             admin_key=admin_key)
    transport = httpx.ASGITransport(app=build_app(services))
    api = httpx.AsyncClient(transport=transport, base_url="http://lorafleet", timeout=120)
    serving = ServingClient("http://lorafleet", admin_key, transport=transport,
                            replicas_ttl=replicas_ttl)
    try:
        yield TinyServing(model_dir, engine, services, api, serving)
    finally:
        await serving.aclose()
        await api.aclose()
        await services.registry.close()
        await engine.shutdown()


async def _bench(n: int, data_dir: Path, work: Path) -> dict[str, Any]:
    async with tiny_serving(data_dir, work, ADMIN_KEY) as world:
        return await _bench_on(world, n, work)


async def _bench_on(world: TinyServing, n: int, work: Path) -> dict[str, Any]:
    from lorafleet.adapters.keys import generate_key
    from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME, make_random_adapter

    from .emulation import NAMESPACE, run_operator, secret_manifest
    from .settings import OperatorConfig
    from .tenant_store import RegistryTenantStore

    src = make_random_adapter(world.model_dir, work / "adapter", rank=4,
                              target_modules=["q_proj", "v_proj"], seed=1,
                              base_model_name=TINY_MODEL_NAME)
    api, serving, services = world.api, world.serving, world.services
    key, _ = generate_key()
    results: dict[str, Any] = {"adapters": n}
    op_config = OperatorConfig(resync_seconds=30.0, tenant_resync_seconds=60.0,
                               tenant_namespaces={NAMESPACE: ("*",)})
    async with run_operator(serving, RegistryTenantStore(services.registry),
                            config=op_config, trim_request_log=True) as cluster:
        await cluster.apply(SECRETS, secret_manifest("bench-key", key))
        await cluster.apply(TENANTS, {
            "apiVersion": "lorafleet.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "bench"},
            "spec": {"apiKeySecrets": [{"name": "bench-key"}]}})
        await cluster.wait_for(
            lambda: ((cluster.get(TENANTS, "bench") or {}).get("status", {})
                     .get("phase") == "Ready"), timeout=30, what="tenant")

        def phase(name: str) -> str | None:
            return ((cluster.get(ADAPTERS, name) or {}).get("status", {}).get("phase"))

        started = time.perf_counter()
        await cluster.apply(ADAPTERS, _adapter("first", str(src), TINY_MODEL_NAME))
        await cluster.wait_for(lambda: phase("first") == "Ready", timeout=60, what="Ready",
                               interval=0.005)
        results["apply_to_ready_s"] = round(time.perf_counter() - started, 3)
        while True:
            r = await api.post("/v1/chat/completions",
                               headers={"Authorization": f"Bearer {key}"},
                               json={"model": "first", "max_tokens": 1,
                                     "messages": [{"role": "user", "content": "hi"}]})
            if r.status_code == 200:
                break
            await asyncio.sleep(0.01)
        results["apply_to_first_request_s"] = round(time.perf_counter() - started, 3)

        names = [f"a{i:04d}" for i in range(n)]
        started = time.perf_counter()
        await asyncio.gather(*(cluster.apply(ADAPTERS, _adapter(
            name, str(src), TINY_MODEL_NAME, mode="demand")) for name in names))
        results["apply_all_s"] = round(time.perf_counter() - started, 3)
        await cluster.wait_for(lambda: all(phase(name) == "Ready" for name in names),
                               timeout=3600, what="all Ready", interval=0.5)
        results["all_ready_s"] = round(time.perf_counter() - started, 3)
        results["peak_rss_mib"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafleet.operator.bench")
    parser.add_argument("--adapters", type=int, default=1000,
                        help="LoRAAdapters applied at once for the scale run")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("LORAFLEET_DATA_DIR", ".lorafleet")))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lf-operator-bench-") as tmp:
        results = asyncio.run(_bench(args.adapters, args.data_dir, Path(tmp)))
    for name, value in results.items():
        print(f"{name:>26}: {value}")
    goal = results["apply_to_first_request_s"] <= 2.0
    print(f"{'goal (first request <= 2 s)':>26}: {'met' if goal else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
