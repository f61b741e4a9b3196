"""LoRAFleet's CPU Punica wrapper against a per-row reference and against vLLM's stock ops.

Property-based over shapes, slices (merged qkv / gate_up), live ranks below ``max_lora_rank``
(including 0: an adapter that does not target the layer), slot assignments (``-1`` rows, one
slot, all slots, unsorted and interleaved rows), both compute paths and both dtypes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm.lora.layers.utils import LoRAMapping

from lorafleet.serving.engine.lora_cpu import compute, ops
from lorafleet.serving.engine.lora_cpu.wrapper import PunicaWrapperFleetCPU

MAX_RANK = 16
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def stacked(slots: int, ranks: list[list[int]], in_f: int, outs: list[int], dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    a_st, b_st = [], []
    for i, out in enumerate(outs):
        a = torch.zeros(slots, 1, MAX_RANK, in_f)
        b = torch.zeros(slots, 1, out, MAX_RANK)
        for s in range(slots):
            r = ranks[s][i]
            a[s, 0, :r] = torch.randn(r, in_f, generator=g) / in_f**0.5
            b[s, 0, :, :r] = torch.randn(out, r, generator=g) / max(r, 1) ** 0.5
        a_st.append(a.to(dtype))
        b_st.append(b.to(dtype))
    return tuple(a_st), tuple(b_st)


def reference(y, x, a_st, b_st, idx, scale, outs):
    y = y.clone().float()
    for t, s in enumerate(idx.tolist()):
        if s < 0:
            continue
        off = 0
        for a, b, out in zip(a_st, b_st, outs, strict=True):
            y[t, off : off + out] += scale * (x[t].float() @ a[s, 0].float().T) @ b[s, 0].float().T
            off += out
    return y


def wrapper_for(idx: list[int], slots: int, prefill: bool) -> PunicaWrapperFleetCPU:
    w = PunicaWrapperFleetCPU(max_num_batched_tokens=512, max_batches=512, device="cpu")
    ids = [s + 1 if s >= 0 else 0 for s in idx]  # LoRA id = slot + 1; 0 = no adapter
    mapping = LoRAMapping(index_mapping=tuple(ids), prompt_mapping=tuple(ids), is_prefill=prefill)
    w.update_metadata(mapping, [s + 1 for s in range(slots)], slots, 1000)
    return w


@st.composite
def cases(draw):
    slots = draw(st.integers(1, 4))
    outs = draw(st.sampled_from([[24], [24, 8, 8], [40, 40]]))
    ranks = [[draw(st.sampled_from([0, 1, 4, 8, MAX_RANK])) for _ in outs] for _ in range(slots)]
    n = draw(st.integers(1, 70))
    idx = draw(st.lists(st.integers(-1, slots - 1), min_size=n, max_size=n))
    if draw(st.booleans()):
        idx = sorted(idx)  # prefill-like: each slot's rows contiguous
    return dict(slots=slots, outs=outs, ranks=ranks, idx=idx,
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                path=draw(st.sampled_from(["auto", "packed", "grouped"])),
                scale=draw(st.sampled_from([1.0, 0.5])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_wrapper_matches_per_row_reference(case, monkeypatch_module) -> None:
    in_f, outs, dtype = 32, case["outs"], case["dtype"]
    monkeypatch_module.setattr(compute, "PACKED_MAX_WORK",
                               {"auto": 2048, "packed": 10**9, "grouped": 0}[case["path"]])
    a_st, b_st = stacked(case["slots"], case["ranks"], in_f, outs, dtype, case["seed"])
    g = torch.Generator().manual_seed(case["seed"] + 1)
    n = len(case["idx"])
    x = torch.randn(n, in_f, generator=g).to(dtype)
    y = torch.randn(n, sum(outs), generator=g).to(dtype)
    idx = torch.tensor(case["idx"])
    expect = reference(y, x, a_st, b_st, idx, case["scale"], outs)
    w = wrapper_for(case["idx"], case["slots"], prefill=n > 8)
    w.add_lora_linear(y, x, a_st, b_st, case["scale"], tuple(outs))
    torch.testing.assert_close(y.float(), expect, **TOL[dtype])
    base_rows = idx < 0
    torch.testing.assert_close(y.float()[base_rows], expect[base_rows], rtol=0, atol=0)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 16, 64, 300])
def test_equals_stock_ops_after_the_index_fix(n: int, dtype) -> None:
    """Stock vLLM ops on rows with an adapter (where they are right) agree with ours."""
    stock = ops.pristine_stock_ops()
    slots, outs, in_f = 4, [24, 8, 8], 32
    ranks = [[MAX_RANK] * 3, [8] * 3, [4, 4, 4], [MAX_RANK, 0, MAX_RANK]]
    a_st, b_st = stacked(slots, ranks, in_f, outs, dtype, n)
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(-1, slots, (n,), generator=g)
    x = torch.randn(n, in_f, generator=g).to(dtype)
    y0 = torch.zeros(n, sum(outs), dtype=dtype)
    ours = y0.clone()
    wrapper_for(idx.tolist(), slots, prefill=n > 16).add_lora_linear(
        ours, x, a_st, b_st, 1.0, tuple(outs))
    theirs = y0.clone()
    off = 0
    for a, b, out in zip(a_st, b_st, outs, strict=True):
        buf = torch.zeros(n, MAX_RANK, dtype=torch.float32)
        stock.bgmv_shrink(x, a, buf, idx, 1.0)
        stock.bgmv_expand_slice(buf, b, theirs, idx, off, out, add_inputs=True)
        off += out
    rows = idx >= 0  # stock gives -1 rows the last slot's adapter: the bug we fix
    torch.testing.assert_close(ours[rows].float(), theirs[rows].float(), **TOL[dtype])
    assert torch.all(ours[~rows] == 0)


def test_weights_rewritten_in_place_are_picked_up() -> None:
    """vLLM loads an adapter into a slot in place; the cached rank-trimmed pack must follow."""
    a_st, b_st = stacked(2, [[4], [8]], 16, [8], torch.float32, 0)
    x = torch.randn(3, 16)
    w = wrapper_for([0, 1, -1], 2, prefill=False)
    first = torch.zeros(3, 8)
    w.add_lora_linear(first, x, a_st, b_st, 1.0, (8,))
    a_st[0][1, 0, :MAX_RANK].copy_(torch.randn(MAX_RANK, 16))  # set_lora-style write, rank 16 now
    b_st[0][1, 0].copy_(torch.randn(8, MAX_RANK))
    second = torch.zeros(3, 8)
    w.add_lora_linear(second, x, a_st, b_st, 1.0, (8,))
    torch.testing.assert_close(second, reference(torch.zeros(3, 8), x, a_st, b_st,
                                                 torch.tensor([0, 1, -1]), 1.0, [8]))
    assert w.packs.rebuilds == 2
    w.add_lora_linear(torch.zeros(3, 8), x, a_st, b_st, 1.0, (8,))
    assert w.packs.rebuilds == 2  # steady state: no rebuild


def test_live_ranks_skip_padding_and_untargeted_slots() -> None:
    a_st, b_st = stacked(3, [[4], [0], [MAX_RANK]], 16, [8], torch.float32, 1)
    w = wrapper_for([0, 1, 2], 3, prefill=False)
    pack = w.packs.get(a_st, b_st)
    assert [r[0] for r in pack.ranks] == [4, 0, MAX_RANK]
    assert pack.packed_for((0, 1, 2)).a_t.shape == (16, 4 + MAX_RANK)


def test_live_ranks_see_negative_weights_and_agree_slot_by_slot() -> None:
    """The first build scans every slot at once; a noted write re-scans one slot: both find
    the same live ranks, whatever the weights' signs (an A row of negatives is live) and with
    a zero row inside the live rank (it stays inside)."""
    from lorafleet.serving.engine.lora_cpu.packing import LayerPack, build_pack

    a_st, b_st = stacked(4, [[3], [0], [MAX_RANK], [6]], 16, [8], torch.float32, 3)
    a_st[0][0, 0, :3] = -a_st[0][0, 0, :3].abs()  # slot 0: all-negative A rows
    a_st[0][3, 0, 2] = 0  # slot 3: a dead row below the last live one
    whole = build_pack(a_st, b_st)
    one_by_one = LayerPack(owner=a_st[0], versions=(), ranks=[[0]] * 4, a_t={}, b_t={})
    for slot in range(4):
        one_by_one.refresh(a_st, b_st, [slot])
    assert whole.ranks == one_by_one.ranks == [[3], [0], [MAX_RANK], [6]]


def test_plugin_points_vllms_cpu_platform_at_our_wrapper(monkeypatch) -> None:
    from vllm.platforms.cpu import CpuPlatform

    import lorafleet.serving.engine.lora_cpu as plugin

    stock = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    # vLLM may already have run the plugin in this process: start from the stock answer.
    monkeypatch.setattr(CpuPlatform, "get_punica_wrapper", classmethod(lambda cls: stock))
    monkeypatch.setenv("LORAFLEET_STOCK_LORA_OPS", "1")
    plugin.register()  # the switch: stock stays stock
    assert CpuPlatform.get_punica_wrapper() == stock
    monkeypatch.setenv("LORAFLEET_STOCK_LORA_OPS", "0")
    plugin.register()
    assert plugin.is_registered()


def test_a_noted_slot_write_refreshes_only_that_slot() -> None:
    from lorafleet.serving.engine.lora_cpu.packing import note_slot_written

    a_st, b_st = stacked(3, [[4], [8], [MAX_RANK]], 16, [8], torch.float32, 2)
    idx = [0, 1, 2, -1]
    x = torch.randn(4, 16)
    w = wrapper_for(idx, 3, prefill=False)
    w.add_lora_linear(torch.zeros(4, 8), x, a_st, b_st, 1.0, (8,))
    untouched = w.packs.get(a_st, b_st).a_t[0]
    a_st[0][1] = 0  # what vLLM's reset_lora + set_lora do: slot 1 gets a rank-2 adapter
    b_st[0][1] = 0
    a_st[0][1, 0, :2] = torch.randn(2, 16)
    b_st[0][1, 0, :, :2] = torch.randn(8, 2)
    note_slot_written(a_st[0], 1)
    got = torch.zeros(4, 8)
    w.add_lora_linear(got, x, a_st, b_st, 1.0, (8,))
    pack = w.packs.get(a_st, b_st)
    assert (w.packs.rebuilds, w.packs.refreshes) == (1, 1)
    assert pack.a_t[0] is untouched and [r[0] for r in pack.ranks] == [4, 2, MAX_RANK]
    torch.testing.assert_close(got, reference(torch.zeros(4, 8), x, a_st, b_st, torch.tensor(idx), 1.0, [8]))


@pytest.mark.parametrize("targets_head", [True, False])
def test_logits_use_the_sampler_rows(targets_head: bool) -> None:
    """LM-head LoRA: rows are sampled tokens (``sampler_indices``), one slice as wide as the vocab."""
    vocab, hidden = 40, 16
    ranks = [[4], [8]] if targets_head else [[0], [0]]
    (a,), (b,) = stacked(2, ranks, hidden, [vocab], torch.float32, 3)
    w = PunicaWrapperFleetCPU(max_num_batched_tokens=64, max_batches=64, device="cpu")
    # Prefill of two requests (3 and 2 tokens); each samples one token from its last row.
    mapping = LoRAMapping(index_mapping=(1, 1, 1, 0, 0), prompt_mapping=(1, 0), is_prefill=True)
    w.update_metadata(mapping, [1, 2], 2, vocab)
    x = torch.randn(2, hidden)
    y = torch.randn(2, vocab)
    expect = reference(y, x, (a,), (b,), torch.tensor([0, -1]), 1.0, [vocab])
    w.add_lora_logits(y, x, a, b, 1.0)
    torch.testing.assert_close(y, expect)
