"""Streaming-aware (TokenFlow-style) scheduling: a pure policy and a thin vLLM adapter.

Boundary: ``model``, ``policy``, ``slots``, ``step_cost`` and ``tracking`` are pure (no vLLM, no clock);
``vllm_scheduler`` is the only module that imports vLLM, and it only translates the policy's
plans into vLLM's queues.
"""

from . import model, policy
from .errors import SchedulingError, UnknownPolicyError, UnsupportedVLLMVersion
from .model import *  # noqa: F403 (the data model: model.__all__)
from .policy import *  # noqa: F403 (the policies: policy.__all__)
from .slots import SlotParams, decide_slots
from .step_cost import StepCostModel

__all__ = [
    *model.__all__,
    *policy.__all__,
    "SchedulingError",
    "SlotParams",
    "StepCostModel",
    "UnknownPolicyError",
    "UnsupportedVLLMVersion",
    "decide_slots",
]
