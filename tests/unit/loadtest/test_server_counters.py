"""The bench's (and the tests') summary of LoRAFleet's scheduler and KV-offload counters
from /metrics."""

from __future__ import annotations

from lorafleet.serving.scheduling.metrics import read_counters

PAGE = """\
# TYPE lorafleet_scheduler_pauses_total counter
lorafleet_scheduler_pauses_total{replica="r0"} 5.0
lorafleet_scheduler_pauses_total{replica="r1"} 2.0
# TYPE lorafleet_scheduler_decisions_total counter
lorafleet_scheduler_decisions_total{replica="r0",action="pause",reason="buffer_long"} 5.0
lorafleet_scheduler_decisions_total{replica="r0",action="admit",reason="ttft_urgency"} 3.0
lorafleet_scheduler_decisions_total{replica="r0",action="admit",reason="wait_bound"} 1.0
# TYPE lorafleet_kv_offload_resumes_total counter
lorafleet_kv_offload_resumes_total{replica="r0",result="restored"} 4.0
# TYPE lorafleet_requests_total counter
lorafleet_requests_total{tenant="t",adapter="a",status="200"} 9.0
# TYPE lorafleet_scheduler_resume_latency_seconds histogram
lorafleet_scheduler_resume_latency_seconds_bucket{replica="r0",le="+Inf"} 4.0
lorafleet_scheduler_resume_latency_seconds_count{replica="r0"} 4.0
lorafleet_scheduler_resume_latency_seconds_sum{replica="r0"} 0.2
# TYPE lorafleet_scheduler_full_batch_tokens_per_second gauge
lorafleet_scheduler_full_batch_tokens_per_second{replica="r0"} 55.5
"""


def test_counters_are_summed_over_replicas_by_label_and_nothing_else_is_kept():
    assert read_counters(PAGE) == {
        "lorafleet_kv_offload_resumes{result=restored}": 4.0,
        "lorafleet_scheduler_decisions{action=admit,reason=ttft_urgency}": 3.0,
        "lorafleet_scheduler_decisions{action=admit,reason=wait_bound}": 1.0,
        "lorafleet_scheduler_decisions{action=pause,reason=buffer_long}": 5.0,
        "lorafleet_scheduler_full_batch_tokens_per_second": 55.5,
        "lorafleet_scheduler_pauses": 7.0,
    }


def test_a_server_without_them_gives_nothing():
    assert read_counters("# TYPE x counter\nx_total 1\n") == {}
