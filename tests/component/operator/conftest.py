"""The real kopf operator, in-process, against kmock's Kubernetes API emulator.

Serving is a faithful in-test implementation of the admin API contract (docs/contracts.md): it
fetches with `lorafleet.adapters.fetch_adapter` and validates with `validate_adapter_dir` against
a tiny Llama config, so invalid adapters are refused by the real rules. Tenants and keys go to
the real registry (SQLite backend), which the fake serving reads (404 for unknown tenants).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio

kopf = pytest.importorskip("kopf")

from lorafleet.adapters.basemodel import base_model_info_from_config  # noqa: E402
from lorafleet.adapters.errors import AdapterFetchError, AdapterValidationError  # noqa: E402
from lorafleet.adapters.registry import Registry, open_registry  # noqa: E402
from lorafleet.adapters.sources import fetch_adapter  # noqa: E402
from lorafleet.adapters.validation import ValidationLimits, validate_adapter_dir  # noqa: E402
from lorafleet.operator.emulation import (  # noqa: E402
    Cluster,
    run_operator,
    secret_manifest,
)
from lorafleet.operator.serving_client import ServingClient  # noqa: E402
from lorafleet.operator.tenant_store import RegistryTenantStore  # noqa: E402

BASE_MODEL = "tiny-llama"
TINY_CONFIG = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
               "num_key_value_heads": 2, "num_hidden_layers": 2}
ADAPTERS = "lorafleet.io/v1alpha1/loraadapters"
TENANTS = "lorafleet.io/v1alpha1/tenants"
SECRETS = "v1/secrets"


def write_adapter(dest: Path, *, base_model: str = BASE_MODEL, rank: int = 2,
                  seed: int = 0, pickle: bool = False) -> Path:
    """A tiny PEFT LoRA directory for `TINY_CONFIG` (q_proj, v_proj)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    hidden = TINY_CONFIG["hidden_size"]
    tensors = {}
    for layer in range(TINY_CONFIG["num_hidden_layers"]):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, hidden),
                                                                     dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, rank),
                                                                     dtype=np.float32)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    (dest / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": base_model, "r": rank,
        "lora_alpha": rank, "target_modules": ["q_proj", "v_proj"], "bias": "none"}))
    if pickle:
        (dest / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must be refused
    return dest


class FakeServing:
    """The admin API of docs/contracts.md over in-memory state, with real fetch and validation."""

    def __init__(self, registry: Registry, workdir: Path, replicas: int = 2) -> None:
        self.registry = registry
        self.workdir = workdir
        self.base = base_model_info_from_config(TINY_CONFIG, BASE_MODEL)
        self.adapters: dict[tuple[str, str], dict[str, Any]] = {}
        self.replicas: dict[str, set[str]] = {f"replica-{i}": set() for i in range(replicas)}
        self.calls: list[tuple[str, str]] = []
        self.registrations: list[str] = []  # names, one per registration serving accepted
        self._n = 0

    def add_replica(self) -> str:
        rid = f"replica-{len(self.replicas)}"
        self.replicas[rid] = set()
        return rid

    def loaded_ids(self) -> set[str]:
        return set().union(*self.replicas.values()) if self.replicas else set()

    @staticmethod
    def _error(status: int, message: str, code: str) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": message, "type": "invalid_request_error",
                                                      "param": None, "code": code}})

    def _view(self, record: dict[str, Any]) -> dict[str, Any]:
        held = sorted(r for r, ids in self.replicas.items() if record["adapter_id"] in ids)
        return {**record, "replicas": held}

    def _load(self, record: dict[str, Any], count: int) -> None:
        aid = record["adapter_id"]
        holders = [r for r, ids in self.replicas.items() if aid in ids]
        others = sorted((r for r in self.replicas if r not in holders),
                        key=lambda r: len(self.replicas[r]))
        for rid in others[: max(0, count - len(holders))]:
            self.replicas[rid].add(aid)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path))
        parts = request.url.path.strip("/").split("/")
        if parts[:2] != ["admin", "v1"]:
            return self._error(404, "not found", "not_found")
        rest = parts[2:]
        if request.method == "GET" and rest == ["replicas"]:
            return httpx.Response(200, json={"data": [{"replica_id": r, "adapters": sorted(ids)}
                                                      for r, ids in self.replicas.items()]})
        if len(rest) < 3 or rest[0] != "tenants" or rest[2] != "adapters":
            return self._error(404, "not found", "not_found")
        tenant = rest[1]
        if await self.registry.get_tenant(tenant) is None:
            return self._error(404, f"tenant {tenant!r} not found", "tenant_not_found")
        body = json.loads(request.content) if request.content else {}
        if request.method == "POST" and len(rest) == 3:
            return await asyncio.to_thread(self._register, tenant, body)
        key = (tenant, rest[3]) if len(rest) > 3 else None
        record = self.adapters.get(key) if key else None
        if record is None:
            return self._error(404, f"adapter {rest[3] if key else ''!r} not found",
                               "adapter_not_found")
        if request.method == "GET" and len(rest) == 4:
            return httpx.Response(200, json=self._view(record))
        if request.method == "POST" and rest[4:] == ["load"]:
            self._load(record, int(body.get("replicas") or len(self.replicas)))
            return httpx.Response(200, json=self._view(record))
        if request.method == "DELETE" and len(rest) == 4:
            for ids in self.replicas.values():
                ids.discard(record["adapter_id"])
            del self.adapters[key]
            return httpx.Response(204)
        return self._error(405, "method not allowed", "method_not_allowed")

    def _register(self, tenant: str, body: dict[str, Any]) -> httpx.Response:
        self._n += 1
        dest = self.workdir / f"fetch-{self._n}"
        try:
            root = fetch_adapter(body["source"], dest, max_bytes=64 << 20)
            manifest = validate_adapter_dir(root, self.base, ValidationLimits())
        except AdapterValidationError as exc:
            return self._error(422, str(exc), exc.code)
        except AdapterFetchError as exc:
            if exc.transient:
                return self._error(503, exc.reason, "fetch_unavailable")
            return self._error(422, exc.reason, "fetch_failed")
        name = body["name"]
        record = {"tenant": tenant, "name": name, "source": body["source"],
                  "base_model": self.base.name, "digest": manifest.digest,
                  "size_bytes": manifest.size_bytes,
                  "adapter_id": f"{tenant}/{name}@{manifest.digest[:12]}"}
        old = self.adapters.get((tenant, name))
        if old is not None and old["adapter_id"] != record["adapter_id"]:
            # New version first, on the same replicas, then the old one goes.
            holders = [r for r, ids in self.replicas.items() if old["adapter_id"] in ids]
            for rid in holders:
                self.replicas[rid].add(record["adapter_id"])
            for rid in holders:
                self.replicas[rid].discard(old["adapter_id"])
        self.adapters[(tenant, name)] = record
        self.registrations.append(name)
        if body.get("load", True):
            self._load(record, len(self.replicas))
        return httpx.Response(201, json=self._view(record))


def secret(name: str, key: str, data_key: str = "apiKey") -> dict[str, Any]:
    return secret_manifest(name, key, data_key)


@pytest.fixture()
def workdir() -> Any:
    with tempfile.TemporaryDirectory(prefix="lf-operator-") as tmp:
        yield Path(tmp)


@pytest_asyncio.fixture()
async def registry(workdir: Path) -> AsyncIterator[Registry]:
    """The real registry (SQLite backend): what the operator writes, serving reads."""
    reg = open_registry(f"sqlite:///{workdir}/registry.db")
    yield reg
    await reg.close()


@pytest.fixture()
def tenant_store(registry: Registry) -> RegistryTenantStore:
    return RegistryTenantStore(registry)


@pytest.fixture()
def serving(registry: Registry, workdir: Path) -> FakeServing:
    return FakeServing(registry, workdir / "serving")


@asynccontextmanager
async def operator_on(serving: FakeServing, tenant_store: RegistryTenantStore,
                      **options: Any) -> AsyncIterator[Cluster]:
    """The real operator (run_operator with `options`) talking to `serving` through its client."""
    client = ServingClient("http://serving", "admin-key",
                           transport=httpx.MockTransport(serving.handle), replicas_ttl=0.0)
    try:
        async with run_operator(client, tenant_store, **options) as cluster:
            yield cluster
    finally:
        await client.aclose()


@pytest_asyncio.fixture()
async def cluster(serving: FakeServing,
                  tenant_store: RegistryTenantStore) -> AsyncIterator[Cluster]:
    async with operator_on(serving, tenant_store) as running:
        yield running
