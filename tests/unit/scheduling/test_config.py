"""Choosing and tuning the policy: the engine config and ``lorafleet serve`` flags."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet.serving.config import EngineConfig
from lorafleet.serving.engine.vllm_engine import scheduling_engine_args


def config(**kw: object) -> EngineConfig:
    return EngineConfig(model_dir="/m", served_model_name="m", **kw)  # type: ignore[arg-type]


def test_policy_knobs_reach_the_scheduler_by_name():
    cfg = config(scheduling_policy="tokenflow",
                 scheduling_params={"resume_margin_s": 2.0, "pause_min_buffer_s": 4.0})
    args = scheduling_engine_args(cfg, "/tmp/core.prom")
    sched = args["additional_config"]["lorafleet_scheduling"]
    assert sched["params"] == {"resume_margin_s": 2.0, "pause_min_buffer_s": 4.0}
    assert sched["policy"] == "tokenflow"
    assert args["kv_transfer_config"].kv_connector == "PauseOffloadConnector"


def test_fcfs_is_stock_vllm_where_every_sequence_can_have_a_slot():
    assert scheduling_engine_args(config(max_num_seqs=16, max_loras=16), "/tmp/core.prom") == {}


def test_fcfs_with_fewer_slots_than_sequences_gets_slot_admission_and_no_offload():
    args = scheduling_engine_args(
        config(max_num_seqs=16, max_loras=8, lora_slot_wait_s=3.0, lora_tenant_slot_share=0.25),
        "/tmp/core.prom")
    sched = args["additional_config"]["lorafleet_scheduling"]
    assert sched["policy"] == "fcfs"
    assert sched["slots"] == {"wait_s": 3.0, "tenant_share": 0.25}
    assert "kv_transfer_config" not in args


def test_unset_slots_are_sized_to_the_platform():
    assert config(max_num_seqs=16, max_cpu_loras=32, num_gpus=0).max_loras == 16
    assert config(max_num_seqs=64, max_cpu_loras=32, num_gpus=0).max_loras == 32
    assert config(max_num_seqs=64, num_gpus=1).max_loras == 4
    assert config(max_num_seqs=64, max_loras=6, num_gpus=0).max_loras == 6


def test_unknown_knobs_are_refused_with_the_known_names():
    with pytest.raises(ValidationError, match="unknown scheduling parameter.*resume_margin_s"):
        config(scheduling_params={"resume_margn_s": 2.0})


@pytest.mark.parametrize(("knobs", "why"), [
    ({"min_run_s": -1.0}, "min_run_s must be >= 0"),
    ({"rate_headroom": 1.5}, "rate_headroom must be <= 1"),
    ({"prefill_tokens_per_s": 0.0}, "prefill_tokens_per_s must be > 0"),
    ({"max_wait_s": float("nan")}, "max_wait_s must be >= 0"),
])
def test_knobs_out_of_range_are_refused(knobs, why):
    with pytest.raises(ValidationError, match=why):
        config(scheduling_params=knobs)


def test_the_serve_flag_parses_name_value_pairs():
    import argparse

    from lorafleet.serving.cli import _name_value

    assert _name_value("resume_margin_s=2.5") == ("resume_margin_s", 2.5)
    for bad in ("resume_margin_s", "=2", "x=fast"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=NUMBER"):
            _name_value(bad)
