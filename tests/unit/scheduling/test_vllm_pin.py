"""The vLLM scheduler subclass refuses a vLLM it was not written against."""

from __future__ import annotations

import pytest

from lorafleet.serving.scheduling import UnsupportedVLLMVersion


def test_other_vllm_versions_are_refused_clearly():
    from lorafleet.serving.scheduling.vllm_scheduler import SUPPORTED_VLLM, check_vllm_version

    check_vllm_version(SUPPORTED_VLLM)
    with pytest.raises(UnsupportedVLLMVersion, match="--scheduling-policy fcfs"):
        check_vllm_version("0.33.0")
