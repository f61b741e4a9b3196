"""PauseOffloadConnector: a paused request's KV blocks go to the host/disk tiers, and come back
when it resumes, instead of being recomputed. A vLLM 0.32 KV connector (``KVConnectorBase_V1``).

How a pause flows (TokenFlow scheduler, ``serving/scheduling/vllm_scheduler.py``):

1. The scheduler decides to pause request R. Before vLLM's ``_preempt_request`` frees R's
   blocks it calls :meth:`PauseOffloadConnector.offload_on_pause`, which records R's *full*
   blocks (block ids and how many tokens they hold) as a pending save.
2. ``build_connector_meta`` hands the pending saves to the worker in this step's metadata.
3. Worker side, ``start_load_kv`` runs before the step's forward pass (vLLM runs it after
   the forward unless the step has a synchronous load, so the scheduler marks steps with
   saves as such): it copies each saved block (all layers) out of vLLM's paged cache into
   the :class:`~.tiers.TieredStore` first, so a block that vLLM has just handed to another
   request is read before anything overwrites it. Loads come after the saves in the same call.
4. When R is scheduled again, vLLM first counts its prefix-cache hits (freed blocks stay in
   the prefix cache until reused), then asks ``get_num_new_matched_tokens``: if the store
   still holds R's blocks beyond the local hits, they are claimed; ``update_state_after_alloc``
   learns the new block ids; the next ``start_load_kv`` copies them back in.
5. A block the store evicted (bounded capacity, LRU; host memory spills to disk when a disk
   tier is configured) makes the match stop there: the rest is recomputed, correctly.
6. ``request_finished`` drops what the store holds for R.

On the CPU backend vLLM's paged cache lives in host memory too; the store is a separate,
bounded pool outside vLLM's block pool (so offloaded KV does not take blocks from running
requests), plus local disk. The copies are synchronous (there is no second stream on a CPU);
on CUDA they would run on a side stream with pinned buffers (not implemented here).

Scheduler and worker sides meet in one :class:`BlockStore` per engine, looked up by the
engine's id in this process: true for vLLM's in-process (uniproc) executor, which LoRAFleet's
CPU engine uses. Where they run in different processes the scheduler sees an empty store and
everything falls back to recompute (correct, just not faster).

Plugged in with ``kv_transfer_config={"kv_connector": "PauseOffloadConnector",
"kv_connector_module_path": __name__, "kv_role": "kv_both", "kv_connector_extra_config":
{"host_bytes": ..., "disk_dir": ..., "disk_bytes": ...}}``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .tiers import DiskTier, HostPool, TieredStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

CONNECTOR_NAME = "PauseOffloadConnector"


@dataclass
class BlockStore:
    """What the scheduler side and the worker side of one engine share."""

    tiers: TieredStore
    block_size: int
    saved_blocks: dict[str, int] = field(default_factory=dict)
    """request id -> number of its leading full blocks written to the tiers."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def key(request_id: str, index: int) -> str:
        return f"{request_id}/{index}"

    def available_blocks(self, request_id: str) -> int:
        """Leading blocks of ``request_id`` still held (a gap ends the usable prefix)."""
        with self.lock:
            n = self.saved_blocks.get(request_id, 0)
            return self.tiers.matched_prefix([self.key(request_id, i) for i in range(n)])

    def forget(self, request_id: str) -> None:
        with self.lock:
            for i in range(self.saved_blocks.pop(request_id, 0)):
                self.tiers.discard(self.key(request_id, i))


_metrics: Any = None


def _offload_metrics() -> Any:
    global _metrics
    if _metrics is None:
        from ..scheduling.metrics import OffloadMetrics

        _metrics = OffloadMetrics()
    return _metrics


_stores: dict[str, BlockStore] = {}
_stores_lock = threading.Lock()


def store_for(engine_id: str, extra: dict[str, Any], block_size: int) -> BlockStore:
    with _stores_lock:
        found = _stores.get(engine_id)
        if found is None:
            host = HostPool(int(extra.get("host_bytes", 1 << 30)))
            disk = None
            if extra.get("disk_dir"):
                disk = DiskTier(Path(extra["disk_dir"]), int(extra.get("disk_bytes", 4 << 30)))
            found = _stores[engine_id] = BlockStore(TieredStore(host, disk), block_size)
        return found


@dataclass
class Transfer:
    request_id: str
    block_ids: list[int]
    """vLLM block ids, in the request's block order."""
    first_index: int
    """Index (in the request's block list) of ``block_ids[0]``: the store keys' numbering."""
    data: list[bytes] = field(default_factory=list)
    """Loads only: the blocks' bytes, taken from the store when the blocks were claimed, so a
    save in the same step that evicts them cannot leave the load without its data."""


@dataclass
class PauseOffloadMetadata(KVConnectorMetadata):
    saves: list[Transfer] = field(default_factory=list)
    loads: list[Transfer] = field(default_factory=list)


class PauseOffloadConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._block_size = vllm_config.cache_config.block_size
        engine_id = str(self._kv_transfer_config.engine_id)
        self.store = store_for(engine_id, extra, self._block_size)
        self._pending_saves: list[Transfer] = []
        self._pending_loads: dict[str, Transfer] = {}
        self._kv_caches: dict[str, torch.Tensor] = {}

    # -- scheduler side -----------------------------------------------------------------

    def offload_on_pause(self, request: Request, block_ids: list[int]) -> int:
        """Queue the save of ``request``'s full blocks (call before vLLM frees them)."""
        full = min(request.num_computed_tokens // self._block_size, len(block_ids))
        if full <= 0:
            return 0
        self._pending_saves.append(Transfer(request.request_id, list(block_ids[:full]), 0))
        return full

    def has_pending_saves(self) -> bool:
        return bool(self._pending_saves)

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        if request.request_id not in self.store.saved_blocks:
            return 0, False
        held = self.store.available_blocks(request.request_id)
        # At least one token must be computed this step (vLLM samples from it).
        usable = min(held * self._block_size, (request.num_tokens - 1) // self._block_size * self._block_size)
        if usable <= num_computed_tokens:
            if held == 0:
                _offload_metrics().resumes.labels("recomputed").inc()
            return 0, False
        return usable - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]
        first = request.num_computed_tokens // self._block_size
        count = num_external_tokens // self._block_size
        with self.store.lock:
            data = [self.store.tiers.get(self.store.key(request.request_id, first + i))
                    for i in range(count)]
        if any(d is None for d in data):  # cannot happen: matched a moment ago in this thread
            raise RuntimeError(f"offloaded KV of {request.request_id} vanished before its load")
        self._pending_loads[request.request_id] = Transfer(
            request.request_id, list(block_ids[first : first + count]), first,
            [d for d in data if d is not None])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = PauseOffloadMetadata(saves=self._pending_saves, loads=list(self._pending_loads.values()))
        self._pending_saves = []
        self._pending_loads = {}
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.store.forget(request.request_id)
        return False, None

    # -- worker side --------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)

    def _layers(self) -> list[torch.Tensor]:
        # Layers may share one tensor; copy each distinct buffer once.
        seen: dict[int, torch.Tensor] = {}
        for name in sorted(self._kv_caches):
            t = self._kv_caches[name]
            seen.setdefault(t.data_ptr(), t)
        return list(seen.values())

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PauseOffloadMetadata)
        if not meta.saves and not meta.loads:
            return
        layers = self._layers()
        store = self.store
        for t in meta.saves:  # saves first: a freed block may be someone's new block this step
            moved = 0
            with store.lock:
                for i, block in enumerate(t.block_ids):
                    blob = torch.stack([layer[block] for layer in layers]).contiguous()
                    data = blob.numpy().tobytes()
                    store.tiers.put(store.key(t.request_id, t.first_index + i), data)
                    moved += len(data)
                store.saved_blocks[t.request_id] = t.first_index + len(t.block_ids)
            _offload_metrics().blocks.labels("out").inc(len(t.block_ids))
            _offload_metrics().bytes.labels("out").inc(moved)
        for t in meta.loads:
            for block, data in zip(t.block_ids, t.data, strict=True):
                shape = (len(layers), *layers[0][block].shape)
                blob = torch.frombuffer(bytearray(data), dtype=layers[0].dtype).view(shape)
                for layer, values in zip(layers, blob, strict=True):
                    layer[block].copy_(values)
            _offload_metrics().blocks.labels("in").inc(len(t.block_ids))
            _offload_metrics().bytes.labels("in").inc(sum(len(d) for d in t.data))
            _offload_metrics().resumes.labels("restored").inc()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return
