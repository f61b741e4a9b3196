"""The offload connector's worker half on CPU tensors, without an engine.

A pause saves a request's blocks of every layer into the host tier; a resume loads the
claimed bytes into other blocks, which then hold exactly what the paused ones held; a
finished request's blocks leave the tier. The connector is vLLM's real class, built from a
``VllmConfig`` (no model): what runs in the engine's worker process, minus the engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CacheConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

from lorafleet.serving.kvcache.connector import (  # noqa: E402
    CONNECTOR_NAME,
    PauseOffloadConnector,
    PauseOffloadMetadata,
    Transfer,
    block_key,
)

BLOCKS, BLOCK = 8, 32


def connector(tmp_path: Path, role: KVConnectorRole) -> PauseOffloadConnector:
    cfg = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_role="kv_both", engine_id="unit",
            kv_connector_module_path="lorafleet.serving.kvcache.connector",
            kv_connector_extra_config={"host_bytes": 1 << 26, "host_dir": str(tmp_path)}),
        cache_config=CacheConfig(block_size=BLOCK))
    return PauseOffloadConnector(cfg, role)


def step(worker: PauseOffloadConnector, meta: PauseOffloadMetadata) -> None:
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)  # type: ignore[arg-type]
    for name in sorted(worker._kv_caches):
        worker.wait_for_layer_load(name)
    worker.clear_connector_metadata()


def test_a_paused_requests_blocks_come_back_into_new_blocks(tmp_path: Path) -> None:
    worker = connector(tmp_path, KVConnectorRole.WORKER)
    scheduler = connector(tmp_path, KVConnectorRole.SCHEDULER)
    layers = {f"model.layers.{i}.self_attn.attn": torch.randn(BLOCKS, 2, BLOCK, 2, 8)
              for i in range(3)}
    worker.register_kv_caches(layers)
    paused = [3, 1]
    want = [t[paused].clone() for t in layers.values()]

    step(worker, PauseOffloadMetadata(saves=[Transfer("r", paused, 0)]))
    keys = [block_key("r", i) for i in range(len(paused))]
    assert all(scheduler.store.exists(k) for k in keys)

    for t in layers.values():  # the freed blocks go to other requests
        t[paused] = 0.0
    claims = scheduler.store.claimed_prefix(keys, "resume")
    step(worker, PauseOffloadMetadata(loads=[Transfer("r", [6, 4], 0, [str(c) for c in claims])]))
    for t, w in zip(layers.values(), want, strict=True):
        assert torch.equal(t[[6, 4]], w)
    assert not any(Path(c).exists() for c in claims)  # claims are dropped once loaded

    step(worker, PauseOffloadMetadata(discards=keys))
    assert not any(scheduler.store.exists(k) for k in keys)
    worker.shutdown()
