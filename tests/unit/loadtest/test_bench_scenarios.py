"""Bench scenarios and figures that need no server: adapter mixes, ratios to base, op floors."""

from __future__ import annotations

from lorafleet.loadtest.bench import lora_ops
from lorafleet.loadtest.bench.harness import relative_to_base
from lorafleet.loadtest.bench.scenarios import (
    ALL_PROJECTIONS,
    QV,
    adapter_shape,
    get_scenario,
    max_lora_rank,
)


def test_multi_lora_mixes_ranks_and_targets() -> None:
    sc = get_scenario("multi-lora", quick=False)
    shapes = {adapter_shape(sc, i) for i in range(len(sc.adapters))}
    assert {r for r, _ in shapes} == {8, 16, 32}
    assert {t for _, t in shapes} == {QV, ALL_PROJECTIONS}
    # The product's slot default, unless bench's --max-loras says otherwise.
    assert max_lora_rank(sc) == 32 and sc.max_loras is None
    phases = {p.name: p for p in sc.phases}
    assert [len(phases[n].workload.models.entries) for n in ("lora-1", "lora-8", "lora-32")] == [1, 8, 32]
    # Other scenarios keep the uniform rank-8 adapters (their figures stay comparable).
    burst = get_scenario("burst", quick=True)
    assert max_lora_rank(burst) == 8 and adapter_shape(burst, 5)[0] == 8


def test_full_multi_lora_is_issue_20s_client() -> None:
    """16 concurrent streams, ~100-token prompts (96 words), 128 tokens out."""
    for phase in get_scenario("multi-lora", quick=False).phases:
        wl = phase.workload
        assert wl.arrival.concurrency == 16 and wl.stream
        assert wl.prompts.words is not None and wl.prompts.words.value == 96
        assert wl.max_tokens.value == 128


def _doc(phases: dict[str, tuple[float, float]]) -> dict:
    return {"phases": {n: {"summary": {"output_tokens_per_s": t,
                                       "ttft_s": {"p50": f, "p99": 2 * f}}}
                       for n, (t, f) in phases.items()}}


def test_relative_to_base_divides_by_the_same_systems_base_phase() -> None:
    rel = relative_to_base({
        "lorafleet": _doc({"base": (100.0, 2.0), "lora-8": (80.0, 3.0)}),
        "vllm": _doc({"base": (120.0, 2.0), "lora-8": (30.0, 30.0)}),
    })
    assert rel["lorafleet"]["lora-8"] == {"tok/s vs base": 0.8, "TTFT p50 vs base": 1.5,
                                          "TTFT p99 vs base": 1.5}
    assert rel["vllm"]["lora-8"]["tok/s vs base"] == 0.25
    assert "base" not in rel["vllm"]


def test_floor_counts_each_active_adapter_once() -> None:
    one = lora_ops.floor_bytes(lora_ops.Case("decode", 16, 1), 576, (576,), 4)
    eight = lora_ops.floor_bytes(lora_ops.Case("decode", 16, 8), 576, (576,), 4)
    activations = 4 * (16 * 576 + 2 * 16 * 576)
    assert one - activations == 4 * 8 * (576 + 576)  # slot 0 holds rank 8
    ranks = sum(lora_ops.RANKS[s % 3] for s in range(8))
    assert eight - activations == 4 * ranks * (576 + 576)


def test_case_row_layouts() -> None:
    assert lora_ops._indices(lora_ops.Case("decode", 6, 3)) == [0, 1, 2, 0, 1, 2]
    assert lora_ops._indices(lora_ops.Case("prefill", 6, 3)) == [0, 0, 1, 1, 2, 2]


def test_reader_rate_is_declared_only_when_asked_and_only_for_streams() -> None:
    from lorafleet.loadtest.client import build_body
    from lorafleet.loadtest.workload import PlannedRequest

    req = PlannedRequest(0, 0.0, "t", "m", "hi", 8, True, 2.71828)
    assert "lorafleet" not in build_body(req, "chat", temperature=0.0, ignore_eos=False)
    body = build_body(req, "chat", temperature=0.0, ignore_eos=False, declare_reader_rate=True)
    assert body["lorafleet"] == {"consumption_rate": 2.718}
    unstreamed = PlannedRequest(0, 0.0, "t", "m", "hi", 8, False, 3.0)
    assert "lorafleet" not in build_body(unstreamed, "completions", temperature=0.0,
                                         ignore_eos=False, declare_reader_rate=True)
    burst = get_scenario("burst", quick=True).phases[0].workload
    assert burst.reader_rate.median == 3.0 and not burst.declare_reader_rate
