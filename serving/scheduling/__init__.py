"""Streaming-aware (TokenFlow-style) scheduling: a pure policy and a thin vLLM adapter.

Boundary: ``model``, ``policy``, ``slots``, ``step_cost`` and ``tracking`` are pure (no vLLM, no clock);
``vllm_scheduler`` is the only module that imports vLLM, and it only translates the policy's
plans into vLLM's queues.
"""

from .errors import SchedulingError, UnknownPolicyError, UnsupportedVLLMVersion
from .model import (
    DEFAULT_CONSUMPTION_RATE,
    Action,
    Capacity,
    Decision,
    Plan,
    Reason,
    RequestState,
    RequestView,
    StepCost,
    TokenFlowParams,
)
from .policy import (
    POLICIES,
    advance_reader,
    buffer_occupancy,
    decide_fcfs,
    decide_tokenflow,
    make_policy,
    time_to_stall,
)
from .slots import SlotParams, decide_slots
from .step_cost import StepCostModel

__all__ = [
    "DEFAULT_CONSUMPTION_RATE",
    "POLICIES",
    "Action",
    "Capacity",
    "Decision",
    "Plan",
    "Reason",
    "RequestState",
    "RequestView",
    "SchedulingError",
    "SlotParams",
    "StepCost",
    "StepCostModel",
    "TokenFlowParams",
    "UnknownPolicyError",
    "UnsupportedVLLMVersion",
    "advance_reader",
    "buffer_occupancy",
    "decide_fcfs",
    "decide_slots",
    "decide_tokenflow",
    "make_policy",
    "time_to_stall",
]
