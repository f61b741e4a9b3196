"""The adapter cache's disk fills up during an admin adapter import.

The cache directory is a 1 MiB tmpfs (we run as root; without the right to mount, a
filesystem that answers ENOSPC on the first write stands in). The answer must be a clear
OpenAI-shaped 507, nothing may be registered or left half-written in the cache, the engine
is never asked to load anything, and once there is room the same import succeeds.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorafleet.serving.api.app import build_app
from lorafleet.serving.assemble import make_services
from lorafleet.serving.config import EngineConfig
from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME, make_random_adapter, make_tiny_model
from lorafleet.serving.engine.protocol import EngineStats

from .conftest import DATA_DIR

ADMIN = {"Authorization": "Bearer admin"}


class NoEngine:
    """An EngineClient that records load calls (there must be none)."""

    def __init__(self) -> None:
        self.loads: list[str] = []

    async def generate(self, request: Any) -> AsyncIterator[Any]:
        raise AssertionError("no generation here")
        yield

    async def load_adapter(self, adapter: Any, replicas: int | None = None) -> list[str]:
        self.loads.append(adapter.adapter_id)
        return ["r0"]

    async def unload_adapter(self, adapter_id: str) -> None:
        return None

    async def replica_stats(self) -> list[EngineStats]:
        return [EngineStats("r0", (), 0, 4, 8)]

    async def metrics_text(self) -> str:
        return ""


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 1 MiB filesystem for the cache (tmpfs), else a copy that fails with ENOSPC."""
    mnt = tmp_path / "cache-disk"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode == 0
    if not mounted:
        real = shutil.copy2

        def full(src: Any, dst: Any, **kw: Any) -> Any:
            if str(dst).startswith(str(mnt)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real(src, dst, **kw)

        monkeypatch.setattr(shutil, "copy2", full)
    try:
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)


async def test_cache_disk_full_is_a_clean_507(small_disk: Path, tmp_path: Path) -> None:
    model = make_tiny_model(DATA_DIR / "models" / TINY_MODEL_NAME)
    src = make_random_adapter(model, tmp_path / "big", rank=16,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj"],
                              seed=3, base_model_name=TINY_MODEL_NAME)
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert size > 2**20, "the adapter must not fit on the 1 MiB disk"
    cfg = EngineConfig(model_dir=str(model), served_model_name=TINY_MODEL_NAME, dtype="float32",
                       max_model_len=512, max_loras=4, max_lora_rank=16, max_cpu_loras=8,
                       kv_cache_bytes=64 * 2**20)
    engine = NoEngine()
    services = make_services(engine_config=cfg, engines=engine,  # type: ignore[arg-type]
                             registry_url=f"sqlite:///{tmp_path / 'r.db'}", data_dir=tmp_path,
                             admin_key="admin")
    object.__setattr__(services.intake, "cache_dir", small_disk)
    app = build_app(services)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://lorafleet") as c:
        assert (await c.post("/admin/v1/tenants", json={"name": "alice"}, headers=ADMIN)).status_code == 201
        r = await c.post("/admin/v1/tenants/alice/adapters", json={"name": "big", "source": str(src)},
                         headers=ADMIN)
        print(f"\ndisk full: {r.status_code} {r.text}")
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "insufficient_storage" and "space" in err["message"]
        # Nothing half-done: not registered, nothing in the cache, no scratch left, no load.
        r = await c.get("/admin/v1/tenants/alice/adapters", headers=ADMIN)
        assert r.json()["data"] == []
        assert [p for p in small_disk.rglob("*") if p.is_file()] == []
        assert not any((tmp_path / "tmp").iterdir())
        assert engine.loads == []
        # With room again, the same import works.
        object.__setattr__(services.intake, "cache_dir", tmp_path / "roomy-cache")
        r = await c.post("/admin/v1/tenants/alice/adapters", json={"name": "big", "source": str(src)},
                         headers=ADMIN)
        assert r.status_code == 201, r.text
        assert len(engine.loads) == 1
    await services.registry.close()
