"""PauseOffloadConnector: a paused request's KV blocks go to the host/disk tiers, and come back
when it resumes, instead of being recomputed. A vLLM 0.32 KV connector (``KVConnectorBase_V1``).

How a pause flows (TokenFlow scheduler, ``serving/scheduling/vllm_scheduler.py``):

1. The scheduler decides to pause request R. Before vLLM's ``_preempt_request`` frees R's
   blocks it calls :meth:`PauseOffloadConnector.offload_on_pause`, which records R's *full*
   blocks (block ids) as a pending save.
2. ``build_connector_meta`` hands the pending saves (and the discards of finished requests)
   to the worker in this step's metadata.
3. Worker side, ``start_load_kv`` runs before the step's forward pass (vLLM runs it after
   the forward unless the step has a synchronous load, so the scheduler marks steps with
   saves as such): it copies each saved block (all layers) out of vLLM's paged cache into
   the :class:`~.tiers.TieredStore` first, so a block that vLLM has just handed to another
   request is read before anything overwrites it. Loads come after the saves in the same call.
4. When R is scheduled again, vLLM first counts its prefix-cache hits (freed blocks stay in
   the prefix cache until reused), then asks ``get_num_new_matched_tokens``: the scheduler
   *claims* R's leading blocks that the tiers still hold (hard links: an eviction afterwards
   cannot take the bytes away) and reports them; ``update_state_after_alloc`` learns the new
   block ids; the next ``start_load_kv`` copies the claimed bytes in and drops the claims.
5. A block the tiers evicted (bounded capacity, LRU; the host tier spills to disk when a disk
   tier is configured) ends the claim there: the rest is recomputed, correctly.
6. ``request_finished`` sends the discard of R's blocks to the worker.

Processes: on the CPU backend vLLM runs the scheduler in the engine-core process and the
worker in a process of its own, so the two halves share nothing in memory. The tiers are
folders (host: ``/dev/shm``, a memory filesystem; disk: ``disk_dir``) that both see: the
worker writes and evicts, the scheduler only checks and claims. Everything the scheduler
counts (``lorafleet_kv_offload_*``) it knows itself, so the counters live in the engine-core
process, which exports them (the worker's own counters would never be scraped).

Copies go through :class:`~.transfer.BlockCopier`: every layer of a request's blocks at
once, staged in reused host buffers (pinned on CUDA). On CUDA they run on a side stream and
the forward pass waits, layer by layer (``wait_for_layer_load``), only for what that layer
needs; a save's bytes reach the tiers once its copy to the host is done (at the latest in
the next step). On the CPU backend every copy completes inside ``start_load_kv``. Why ours
and not vLLM's OffloadingConnector or LMCache: docs/decisions/0021-kv-offload-path.md.

Plugged in with ``kv_transfer_config={"kv_connector": "PauseOffloadConnector",
"kv_connector_module_path": __name__, "kv_role": "kv_both", "kv_connector_extra_config":
{"host_bytes": ..., "host_dir": ..., "disk_dir": ..., "disk_bytes": ...}}``.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ..scheduling.metrics import offload_metrics
from .tiers import FileTier, TieredStore
from .transfer import BlockCopier, Pending, block_bytes

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

CONNECTOR_NAME = "PauseOffloadConnector"


def block_key(request_id: str, index: int) -> str:
    return f"{request_id}/{index}"


def tier_dirs(engine_id: str, extra: dict[str, Any]) -> tuple[Path, Path | None]:
    """The host and disk tier folders of one engine (the same in every process)."""
    base = extra.get("host_dir")
    if not base:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    host = Path(base) / f"lorafleet-kv-{engine_id}"
    disk = Path(extra["disk_dir"]) / f"lorafleet-kv-{engine_id}" if extra.get("disk_dir") else None
    return host, disk


def open_store(engine_id: str, extra: dict[str, Any]) -> TieredStore:
    host_dir, disk_dir = tier_dirs(engine_id, extra)
    disk = FileTier(disk_dir, int(extra.get("disk_bytes", 4 << 30))) if disk_dir else None
    return TieredStore(FileTier(host_dir, int(extra.get("host_bytes", 1 << 30))), disk)


@dataclass
class Transfer:
    request_id: str
    block_ids: list[int]
    """vLLM block ids, in the request's block order."""
    first_index: int
    """Index (in the request's block list) of ``block_ids[0]``: the store keys' numbering."""
    claims: list[str] = field(default_factory=list)
    """Loads only: the claimed files holding the blocks' bytes, in ``block_ids`` order."""


@dataclass
class PauseOffloadMetadata(KVConnectorMetadata):
    saves: list[Transfer] = field(default_factory=list)
    loads: list[Transfer] = field(default_factory=list)
    discards: list[str] = field(default_factory=list)
    """Keys of finished requests' blocks."""


class PauseOffloadConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._block_size = vllm_config.cache_config.block_size
        self.store = open_store(str(self._kv_transfer_config.engine_id), extra)
        self._block_bytes = 0
        if kv_cache_config is not None and kv_cache_config.num_blocks:
            total = sum(t.size for t in kv_cache_config.kv_cache_tensors)
            self._block_bytes = total // kv_cache_config.num_blocks
        # Scheduler side.
        self._pending_saves: list[Transfer] = []
        self._pending_loads: dict[str, Transfer] = {}
        self._pending_discards: list[str] = []
        self._saved: dict[str, int] = {}
        """request id -> leading full blocks ever sent to the tiers."""
        self._claims: dict[str, list[Path]] = {}
        self._num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else 0
        # Worker side.
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._copier: BlockCopier | None = None
        self._layer_of: dict[str, int] = {}
        """Layer name -> index of its (possibly shared) KV tensor in the copier."""
        self._saving: list[tuple[list[str], Pending]] = []
        """Saves whose copy to the host may still run: their store keys, in block order."""
        self._loading: list[Pending] = []
        if role == KVConnectorRole.WORKER:
            atexit.register(self._remove_tiers)

    # -- scheduler side -----------------------------------------------------------------

    def offload_on_pause(self, request: Request, block_ids: list[int]) -> int:
        """Queue the save of ``request``'s full blocks (call before vLLM frees them)."""
        full = min(request.num_computed_tokens // self._block_size, len(block_ids))
        if full <= 0:
            return 0
        self._drop_claims(request.request_id)
        self._pending_saves.append(Transfer(request.request_id, list(block_ids[:full]), 0))
        self._saved[request.request_id] = max(full, self._saved.get(request.request_id, 0))
        offload_metrics().blocks.labels("out").inc(full)
        offload_metrics().bytes.labels("out").inc(full * self._block_bytes)
        return full

    def has_pending_saves(self) -> bool:
        return bool(self._pending_saves)

    def _tag(self, request_id: str) -> str:
        return hashlib.sha256(request_id.encode()).hexdigest()[:16]

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        saved = self._saved.get(rid, 0)
        if saved == 0:
            return 0, False
        # At least one token must be computed this step (vLLM samples from it).
        limit = min(saved, (request.num_tokens - 1) // self._block_size)
        claims = self._claims.get(rid)
        if claims is None:  # vLLM may ask again (no free blocks last step): claim once
            claims = self._claims[rid] = self.store.claimed_prefix(
                [block_key(rid, i) for i in range(limit)], self._tag(rid))
        usable = len(claims) * self._block_size
        if usable <= num_computed_tokens:
            # vLLM's prefix cache still had them (or the tiers lost the first block).
            offload_metrics().resumes.labels("cached" if num_computed_tokens else "recomputed").inc()
            self._drop_claims(rid)
            return 0, False
        return usable - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        rid = request.request_id
        claims = self._claims.pop(rid, [])
        if num_external_tokens <= 0:
            self._unlink(claims)
            return
        block_ids = blocks.get_block_ids()[0]
        first = request.num_computed_tokens // self._block_size
        count = num_external_tokens // self._block_size
        self._unlink(claims[:first] + claims[first + count:])
        self._pending_loads[rid] = Transfer(
            rid, list(block_ids[first : first + count]), first,
            [str(c) for c in claims[first : first + count]])
        offload_metrics().blocks.labels("in").inc(count)
        offload_metrics().bytes.labels("in").inc(count * self._block_bytes)
        offload_metrics().resumes.labels("restored").inc()

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = PauseOffloadMetadata(saves=self._pending_saves, loads=list(self._pending_loads.values()),
                                    discards=self._pending_discards)
        self._pending_saves = []
        self._pending_loads = {}
        self._pending_discards = []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._drop_claims(rid)
        self._pending_discards += [block_key(rid, i) for i in range(self._saved.pop(rid, 0))]
        return False, None

    def _drop_claims(self, rid: str) -> None:
        self._unlink(self._claims.pop(rid, []))

    @staticmethod
    def _unlink(paths: list[Path]) -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    # -- worker side --------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)
        # Layers may share one tensor; copy each distinct buffer once.
        index: dict[int, int] = {}
        layers: list[torch.Tensor] = []
        for name in sorted(self._kv_caches):
            t = self._kv_caches[name]
            if t.data_ptr() not in index:
                index[t.data_ptr()] = len(layers)
                layers.append(t)
            self._layer_of[name] = index[t.data_ptr()]
        num_blocks = self._num_blocks or layers[0].shape[0]
        self._copier = BlockCopier.for_device(layers, num_blocks) if layers else None

    def _flush_saves(self, wait: bool) -> None:
        """Hand finished saves' bytes to the tiers (all of them when ``wait``)."""
        assert self._copier is not None
        still: list[tuple[list[str], Pending]] = []
        for keys, pending in self._saving:
            if not wait and not pending.ready():
                still.append((keys, pending))
                continue
            pending.wait()
            for i, key in enumerate(keys):
                self.store.put(key, block_bytes(pending.block(i)))
            self._copier.buffers.give(pending.host)
        self._saving = still

    def _release_loads(self) -> None:
        assert self._copier is not None
        for pending in self._loading:
            pending.wait()
            self._copier.buffers.give(pending.host)
        self._loading = []

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PauseOffloadMetadata)
        if self._copier is None:
            return
        self._release_loads()  # the previous step's forward has waited for them
        self._flush_saves(wait=False)
        if not meta.saves and not meta.loads and not meta.discards:
            return
        copier = self._copier
        for t in meta.saves:  # saves first: a freed block may be someone's new block this step
            keys = [block_key(t.request_id, t.first_index + i) for i in range(len(t.block_ids))]
            self._saving.append((keys, copier.save(t.block_ids)))
        for t in meta.loads:
            paths = [Path(c) for c in t.claims]
            host = copier.pack([p.read_bytes() for p in paths])
            self._loading.append(copier.load(t.block_ids, host))
            for p in paths:
                p.unlink(missing_ok=True)
        # On the CPU every save is done: its bytes go out now. Discards come last, after
        # every save that could write the same keys.
        self._flush_saves(wait=bool(meta.discards))
        for key in meta.discards:
            self.store.discard(key)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._copier is None:
            return
        index = self._layer_of.get(layer_name)
        if index is None:  # a layer we cannot place: wait for every copy (correct, slower)
            self._copier.wait_all()
        else:
            self._copier.wait_layer(index)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def _remove_tiers(self) -> None:
        for tier in self.store.tiers():
            shutil.rmtree(tier.root, ignore_errors=True)

    def shutdown(self) -> None:
        if self._role == KVConnectorRole.WORKER:
            self._remove_tiers()
