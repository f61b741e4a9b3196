"""The replica label added to vLLM's and the engine core's series."""

from __future__ import annotations

from lorafleet.serving.metrics import label_samples

CORE = """# HELP lorafleet_kv_offload_blocks_total KV blocks moved.
# TYPE lorafleet_kv_offload_blocks_total counter
lorafleet_kv_offload_blocks_total{direction="out"} 32.0
# HELP lorafleet_scheduler_pauses_total Paused.
# TYPE lorafleet_scheduler_pauses_total counter
lorafleet_scheduler_pauses_total 5.0
# HELP other_series Not ours.
other_series 1.0
"""


def test_core_series_get_the_replica_label_and_others_are_dropped() -> None:
    out = label_samples(CORE, ("lorafleet_",), "r-1")
    assert 'lorafleet_kv_offload_blocks_total{direction="out",replica="r-1"} 32.0' in out
    assert 'lorafleet_scheduler_pauses_total{replica="r-1"} 5.0' in out
    assert "# TYPE lorafleet_scheduler_pauses_total counter" in out
    assert "other_series" not in out


def test_a_label_value_with_spaces_is_kept_whole() -> None:
    out = label_samples('vllm:x{model_name="a b"} 2.0\n', ("vllm:",), "r")
    assert out == 'vllm:x{model_name="a b",replica="r"} 2.0\n'
