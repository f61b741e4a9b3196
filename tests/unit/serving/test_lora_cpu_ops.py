"""LoRAFleet's CPU LoRA ops against a per-row reference, on both paths (gather and grouped)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.serving.engine.lora_cpu import ops


def reference(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    w = w.squeeze(1) if w.dim() == 4 else w
    rows = [x[t] @ w[int(i)].T if i >= 0 else torch.zeros(w.shape[1]) for t, i in enumerate(idx)]
    return torch.stack(rows)


@pytest.mark.parametrize("tokens", [1, 16, 3000])  # decode (gather) and prefill (grouped)
@pytest.mark.parametrize("four_d", [False, True])
def test_matches_reference_with_base_rows(tokens: int, four_d: bool) -> None:
    g = torch.Generator().manual_seed(tokens)
    slots, out_f, in_f = 3, 16, 96
    x = torch.randn(tokens, in_f, generator=g)
    w = torch.randn(slots, out_f, in_f, generator=g)
    idx = torch.randint(-1, slots, (tokens,), generator=g)
    idx[0] = -1  # at least one base row: it must not pick up the last slot
    if four_d:
        w = w.unsqueeze(1)
    got = ops.grouped_lora_matmul(x, w, idx, torch.float32)
    torch.testing.assert_close(got, reference(x, w, idx), rtol=1e-4, atol=1e-4)
    assert torch.all(got[idx < 0] == 0)


@pytest.mark.parametrize("slot", [-1, 0, 2])
def test_one_slot_for_the_whole_batch(slot: int) -> None:
    x = torch.randn(7, 32)
    w = torch.randn(3, 4, 32)
    idx = torch.full((7,), slot)
    torch.testing.assert_close(ops.grouped_lora_matmul(x, w, idx, torch.float32), reference(x, w, idx))


def test_paths_are_chosen_by_size() -> None:
    assert 16 * 16 * 576 <= ops.GATHER_MAX_ELEMENTS < 3000 * 16 * 96


def test_shrink_and_expand_slice_write_where_vllm_expects() -> None:
    x = torch.randn(5, 8)
    a = torch.randn(2, 1, 4, 8)
    idx = torch.tensor([0, -1, 1, 1, -1])
    buf = torch.zeros(5, 4)
    ops.bgmv_shrink(x, a, buf, idx, scaling=0.5)
    torch.testing.assert_close(buf, 0.5 * reference(x, a, idx))
    b = torch.randn(2, 1, 6, 4)
    y = torch.ones(5, 10)
    ops.bgmv_expand_slice(buf, b, y, idx, 2, 6, add_inputs=True)
    expect = torch.ones(5, 10)
    expect[:, 2:8] += reference(buf, b, idx)
    torch.testing.assert_close(y, expect)
