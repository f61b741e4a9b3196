"""Moving KV blocks through host buffers (``kvcache/transfer.py``), on CPU tensors.

What a resume needs: a block saved from one place and loaded into another holds the same
values, in every KV dtype and in both of vLLM's cache layouts (blocks first on the CPU
backend, ``[2, blocks, ...]`` under FlashAttention); blocks not named are untouched; one
block's bytes are the same whatever the layout (the tiers hold bytes, a resume may land on
another layout's engine only in tests, but the format must not depend on it); host buffers
are reused, not allocated per transfer. The CUDA side stream is the same code with events:
it needs a GPU (``resume_bench --device cuda``).
"""

from __future__ import annotations

import pytest
import torch

from lorafleet.serving.kvcache.transfer import (
    BlockCopier,
    CacheLayout,
    HostBuffers,
    block_bytes,
)

N_BLOCKS = 7


def cache(layout: int, dtype: torch.dtype, layers: int = 3) -> list[torch.Tensor]:
    shape = (N_BLOCKS, 2, 4, 3, 8) if layout == 0 else (2, N_BLOCKS, 4, 3, 8)
    return [torch.randn(shape).to(dtype) for _ in range(layers)]


def blocks_of(layers: list[torch.Tensor], dim: int, ids: list[int]) -> list[torch.Tensor]:
    return [layer.index_select(dim, torch.tensor(ids)).clone() for layer in layers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [0, 1])
def test_saved_blocks_load_into_other_blocks_with_the_same_values(dtype, dim) -> None:
    layers = cache(dim, dtype)
    copier = BlockCopier(layers, CacheLayout.infer(layers[0], N_BLOCKS))
    src, dst, bystander = [4, 1], [2, 6], [0]
    want = blocks_of(layers, dim, src)
    untouched = blocks_of(layers, dim, bystander)

    saved = copier.save(src)
    assert saved.ready()
    data = [block_bytes(saved.block(i)) for i in range(len(src))]
    assert len(data[0]) == 3 * 2 * 4 * 3 * 8 * layers[0].element_size()
    for layer in layers:
        layer.index_fill_(dim, torch.tensor(src + dst), 0)  # the blocks were freed and reused

    copier.load(dst, copier.pack(data)).wait()
    for got, w in zip(blocks_of(layers, dim, dst), want, strict=True):
        assert torch.equal(got, w)
    for got, w in zip(blocks_of(layers, dim, bystander), untouched, strict=True):
        assert torch.equal(got, w)
    copier.wait_layer(0)  # no stream on the CPU: nothing to wait for


def test_a_blocks_bytes_do_not_depend_on_the_layout() -> None:
    first = cache(0, torch.float32)
    second = [layer.movedim(0, 1).contiguous() for layer in first]  # same values, [2, blocks, ...]
    a = BlockCopier(first, CacheLayout.infer(first[0], N_BLOCKS)).save([5])
    b = BlockCopier(second, CacheLayout.infer(second[0], N_BLOCKS)).save([5])
    assert block_bytes(a.block(0)) == block_bytes(b.block(0))


def test_layout_is_refused_without_a_blocks_dimension() -> None:
    with pytest.raises(ValueError, match="blocks dimension"):
        CacheLayout.infer(torch.zeros(3, 3, 4), N_BLOCKS)


def test_host_buffers_are_reused_by_shape_and_pinned_only_when_asked() -> None:
    pool = HostBuffers(pin=False, keep=1)
    a = pool.take((2, 3), torch.float32)
    pool.give(a)
    assert pool.take((2, 3), torch.float32) is a
    pool.take((2, 3), torch.float32)
    assert pool.allocated == 2
    assert not a.is_pinned()
