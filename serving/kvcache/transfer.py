"""Moving KV blocks between vLLM's paged cache and host memory, batched and overlapped.

Boundary: torch only (no vLLM, no files, no tiers). The connector says which blocks go out
(``save``) or come in (``load``); this module gathers them for every layer at once, stages
them in host buffers, and tells the forward pass when a layer's blocks may be touched.

Why it exists: a block-at-a-time copy through ``.cpu()`` stalls the device on every block
and allocates pageable memory, which a GPU copies at a fraction of the bus's speed. Here:

- **Host buffers are pinned** when CUDA is available (DMA at full PCIe speed, and the only
  way a device-to-host copy can be asynchronous); plain memory on the CPU backend, where
  pinning buys nothing. They are reused (:class:`HostBuffers`): pinning costs milliseconds
  per call.
- **One bus transfer per direction, on a side stream.** A save first gathers the blocks of
  every layer into one device scratch (a device-to-device copy, microseconds), then copies
  it to the host in one piece. The forward pass waits only for the gather
  (:meth:`BlockCopier.wait_layer`): vLLM may hand a paused request's freed block to another
  request in the same step, and the gather must read it first; the slow device-to-host part
  overlaps the forward. A load copies the host buffer to a device scratch in one piece, then
  scatters it layer by layer; layer ``i``'s forward waits for layer ``i``'s scatter only, so
  the scatters of later layers overlap the compute of earlier ones.
- **On the CPU backend** there is no stream: everything happens at once, in order, and
  ``wait_layer`` returns immediately. The same code runs (and is tested) there.

Layouts: vLLM's CPU backend keeps a layer as ``[blocks, 2, block_size, heads, dim]``;
FlashAttention on CUDA as ``[2, blocks, block_size, heads, dim]``. :class:`CacheLayout` finds
the blocks dimension; what leaves this module is always block-major,
``[layers, blocks, *block]`` with ``*block`` the layer's shape without the blocks dimension,
so one block's bytes are the same whatever the device (``block_bytes``). The host buffer
is ``[blocks, layers, *block]``: each block's bytes are one contiguous run (what the tiers
store, without a copy) and the whole transfer one contiguous buffer (one DMA).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BlockCopier", "CacheLayout", "HostBuffers", "Pending", "block_bytes"]


@dataclass(frozen=True)
class CacheLayout:
    """Where the blocks dimension of a layer's KV tensor is."""

    block_dim: int

    @classmethod
    def infer(cls, layer: torch.Tensor, num_blocks: int) -> CacheLayout:
        """The first of dims 0 and 1 whose size is ``num_blocks`` (vLLM's layouts put it
        there); refuses a tensor where neither is."""
        for dim in (0, 1):
            if layer.dim() > dim and layer.shape[dim] == num_blocks:
                return cls(dim)
        raise ValueError(f"no blocks dimension of size {num_blocks} in a KV tensor of shape "
                         f"{tuple(layer.shape)}")

    def block_shape(self, layer: torch.Tensor) -> tuple[int, ...]:
        shape = list(layer.shape)
        del shape[self.block_dim]
        return tuple(shape)


class HostBuffers:
    """A pool of host staging tensors, by shape and dtype; pinned when ``pin``.

    A buffer is taken for one transfer and given back once its bytes are consumed; the pool
    keeps at most ``keep`` buffers of each shape (pinned memory is a scarce, slow-to-get
    resource: it is locked out of the OS's paging)."""

    def __init__(self, pin: bool, keep: int = 4) -> None:
        self.pin = pin
        self.keep = keep
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = \
            defaultdict(list)
        self.allocated = 0
        """Buffers ever allocated (a test and a benchmark read it: reuse keeps it flat)."""

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        free = self._free[(tuple(shape), dtype)]
        if free:
            return free.pop()
        self.allocated += 1
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def give(self, buf: torch.Tensor) -> None:
        free = self._free[(tuple(buf.shape), buf.dtype)]
        if len(free) < self.keep:
            free.append(buf)


@dataclass
class Pending:
    """A transfer in flight through ``host`` (``[blocks, layers, *block]``): a save's
    destination, a load's source. Give ``host`` back to the pool only once :meth:`ready`."""

    host: torch.Tensor
    done: Any = None
    """A CUDA event recorded after the last copy (None on the CPU: already done)."""

    def ready(self) -> bool:
        return self.done is None or bool(self.done.query())

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.host

    def block(self, i: int) -> torch.Tensor:
        """Block ``i`` of every layer, ``[layers, *block]`` (after :meth:`wait`)."""
        return self.host[i]


def block_bytes(block: torch.Tensor) -> bytes:
    """One block of every layer (``[layers, *block]``) as raw bytes, any dtype."""
    return block.contiguous().view(torch.uint8).numpy().tobytes()


def block_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).view(shape)


class BlockCopier:
    """Saves and loads blocks of every layer of one paged KV cache (see the module doc).

    ``layers``: the distinct KV tensors, in the forward pass's order (layer ``i`` is what
    :meth:`wait_layer` ``(i)`` guards). ``stream``: the side stream (CUDA only); ``None``
    makes every copy synchronous, which is what the CPU backend gets."""

    def __init__(self, layers: list[torch.Tensor], layout: CacheLayout,
                 buffers: HostBuffers | None = None, stream: Any = None) -> None:
        if not layers:
            raise ValueError("no KV layers")
        self.layers = layers
        self.layout = layout
        self.device = layers[0].device
        self.stream = stream
        self.buffers = buffers or HostBuffers(pin=self.device.type == "cuda")
        self.block_shape = layout.block_shape(layers[0])
        self.dtype = layers[0].dtype
        self._layer_ready: dict[int, Any] = {}
        """Layer index -> event the compute stream must wait for before touching the layer."""

    @classmethod
    def for_device(cls, layers: list[torch.Tensor], num_blocks: int) -> BlockCopier:
        """A copier with a side stream and pinned buffers on CUDA, plain ones elsewhere."""
        layout = CacheLayout.infer(layers[0], num_blocks)
        cuda = layers[0].device.type == "cuda"
        stream = torch.cuda.Stream(device=layers[0].device) if cuda else None
        return cls(layers, layout, HostBuffers(pin=cuda), stream)

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)

    def _host(self, n: int) -> torch.Tensor:
        return self.buffers.take((n, len(self.layers), *self.block_shape), self.dtype)

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """``[blocks, layers, *block]`` of the blocks ``idx`` (on the device)."""
        d = self.layout.block_dim
        return torch.stack([layer.index_select(d, idx).movedim(d, 0) for layer in self.layers],
                           dim=1)

    def save(self, block_ids: list[int]) -> Pending:
        """Start copying ``block_ids`` of every layer to host memory."""
        host = self._host(len(block_ids))
        if not block_ids:
            return Pending(host)
        if self.stream is None:
            # Block by block: one gather of all blocks is a large parallel op, and on a
            # busy CPU its threads wait on each other (measured 10-20x slower on 2 cores).
            d = self.layout.block_dim
            for j, b in enumerate(block_ids):
                torch.stack([layer.select(d, b) for layer in self.layers], out=host[j])
            return Pending(host)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            scratch = self._gather(self._index(block_ids))
            for i in range(len(self.layers)):
                self._mark_layer(i)  # the forward may overwrite these blocks after this
            host.copy_(scratch, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return Pending(host, done)

    def load(self, block_ids: list[int], host: torch.Tensor) -> Pending:
        """Start writing ``host`` (``[layers, blocks, *block]``) into ``block_ids``."""
        if not block_ids:
            return Pending(host)
        d = self.layout.block_dim
        if self.stream is None:  # block by block, as in save
            for j, b in enumerate(block_ids):
                for i, layer in enumerate(self.layers):
                    layer.select(d, b).copy_(host[j, i])
            return Pending(host)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            idx = self._index(block_ids)
            values = host.to(self.device, non_blocking=True)
            for i, layer in enumerate(self.layers):
                layer.index_copy_(d, idx, values[:, i].movedim(0, d))
                self._mark_layer(i)
            done = torch.cuda.Event()
            done.record(self.stream)
        return Pending(host, done)

    def _mark_layer(self, i: int) -> None:
        event = torch.cuda.Event()
        event.record(self.stream)
        self._layer_ready[i] = event

    def wait_layer(self, i: int) -> None:
        """Make the compute stream wait for the copies that touch layer ``i`` (no-op on CPU)."""
        event = self._layer_ready.pop(i, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def wait_all(self) -> None:
        for i in list(self._layer_ready):
            self.wait_layer(i)

    def pack(self, blocks: list[bytes]) -> torch.Tensor:
        """Host buffer ``[len(blocks), layers, *block]`` holding these blocks' bytes (the
        format of :func:`block_bytes`), ready for :meth:`load`."""
        host = self._host(len(blocks))
        # A plain memcpy per block (numpy, no torch op): a torch copy of this size runs on
        # the intra-op threads, which wait on each other on a busy CPU.
        flat = host.view(torch.uint8).numpy().reshape(len(blocks), -1)
        for j, data in enumerate(blocks):
            flat[j] = memoryview(data)
        return host
