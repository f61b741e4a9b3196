"""Issue 18's symptom on the real engine: pods that share a registry but not a disk.

Two ingress "pods" (each its own data directory) on one SQLite registry and one shared adapter
store, an engine replica with a node directory of its own. An adapter registered through pod A
still generates through pod B after A's directory (and the upload it imported) are gone; when
no copy can be fetched the client gets a short OpenAI-shaped 503, never a traceback.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from adapterfiles import node_files

from lorafleet.serving.api.app import build_app
from lorafleet.serving.assemble import make_services
from lorafleet.serving.config import EngineConfig
from lorafleet.serving.engine.client import LocalEngineClient
from lorafleet.serving.engine.vllm_engine import VLLMEngine

from .conftest import ADMIN_KEY

pytestmark = pytest.mark.vllm
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


class Pods:
    """Ingress pods built on demand: same registry and store, each its own data directory."""

    def __init__(self, engine: VLLMEngine, config: EngineConfig, root: Path) -> None:
        self.engine, self.config, self.root = engine, config, root
        self.store = (root / "shared-store").as_uri()
        self.opened: list = []

    def client(self, name: str) -> httpx.AsyncClient:
        services = make_services(
            engine_config=self.config, engines=LocalEngineClient([self.engine]),
            registry_url=f"sqlite:///{self.root / 'registry.db'}", data_dir=self.root / name,
            admin_key=ADMIN_KEY, adapter_store=self.store)
        self.opened.append(services)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(services)),
                                 base_url="http://lorafleet", timeout=120)


@pytest.fixture
async def pods(engine: VLLMEngine, engine_config: EngineConfig,
               tmp_path: Path) -> AsyncIterator[Pods]:
    p = Pods(engine, engine_config, tmp_path)
    session_files = engine.adapter_files
    # This test's replica: a node directory of its own, reading the pods' shared store.
    engine.adapter_files = node_files(engine_config, tmp_path / "node", store=p.store)
    try:
        yield p
    finally:
        engine.adapter_files = session_files
        for services in p.opened:
            await services.registry.close()


async def _register(pod: httpx.AsyncClient, tenant: str, source: Path) -> str:
    r = await pod.post("/admin/v1/tenants", json={"name": tenant}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = await pod.post(f"/admin/v1/tenants/{tenant}/keys", json={}, headers=ADMIN)
    key = r.json()["key"]
    r = await pod.post(f"/admin/v1/tenants/{tenant}/adapters", headers=ADMIN,
                       json={"name": "sql", "source": str(source), "load": False})
    assert r.status_code == 201, r.text
    return key


async def _chat(pod: httpx.AsyncClient, key: str) -> httpx.Response:
    return await pod.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "sql", "max_tokens": 4, "temperature": 0,
                                "messages": [{"role": "user", "content": "hi"}]})


async def test_an_adapter_imported_by_a_gone_pod_generates_through_another(
        pods: Pods, adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    upload = shutil.copytree(adapter_dirs["ad-r4-qv"], tmp_path / "upload")
    async with pods.client("pod-a") as a:
        key = await _register(a, "carol", upload)
    shutil.rmtree(tmp_path / "pod-a")  # pod A is gone, with its cache
    shutil.rmtree(upload)  # and the file it imported
    async with pods.client("pod-b") as b:
        r = await _chat(b, key)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


async def test_an_adapter_nothing_can_fetch_is_a_short_503(
        pods: Pods, adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    upload = shutil.copytree(adapter_dirs["ad-r8-all"], tmp_path / "upload")
    async with pods.client("pod-a") as a:
        key = await _register(a, "dave", upload)
    shutil.rmtree(tmp_path / "pod-a")
    shutil.rmtree(upload)
    shutil.rmtree(tmp_path / "shared-store")  # the store lost it too
    async with pods.client("pod-b") as b:
        r = await _chat(b, key)
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["type"] == "service_unavailable"
    assert "could not be fetched" in error["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text and "\\n" not in r.text
    assert len(error["message"]) < 600
