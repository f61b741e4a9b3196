"""Request bodies through vLLM's own request models (``api/body.py``), and logprobs as vLLM's
serving layer formats them (``api/responses.py``): pure, no engine.

The accepted set is vLLM's: a field vLLM knows parses, an unknown one is a 400 that names
it, and the fields that would reach past the tenant are refused by name with the reason.
"""

from __future__ import annotations

from typing import Any

import pytest

from lorafleet.serving.api.body import (
    MAX_SEQUENCES,
    REFUSED,
    ChatBody,
    CompletionBody,
    parse_request,
)
from lorafleet.serving.api.errors import InvalidRequest
from lorafleet.serving.api.responses import LogprobRequest, chat_logprobs, completion_logprobs
from lorafleet.serving.engine.protocol import TokenLogprobs

pytestmark = pytest.mark.middle

MSGS = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSGS, **kw}


def refused(model: type[Any], data: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        parse_request(model, data)
    return e.value


def test_vllm_fields_parse_and_become_sampling_params() -> None:
    body = parse_request(ChatBody, chat(
        logprobs=True, top_logprobs=3, top_k=5, min_p=0.1, repetition_penalty=1.1, min_tokens=2,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object"}}}, lorafleet={"consumption_rate": 5}))
    params = body.to_sampling_params(7, {})
    assert (params.logprobs, params.top_k, params.min_tokens, params.max_tokens) == (3, 5, 2, 7)
    assert params.structured_outputs is not None
    assert params.structured_outputs.json == {"type": "object"}
    assert body.lorafleet is not None and body.lorafleet.consumption_rate == 5


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_fields_past_the_tenant_edge_are_refused_by_name(field: str) -> None:
    value: Any = {"priority": 3, "use_beam_search": True}.get(field, {"x": 1} if field.endswith(
        ("params", "kwargs", "xargs")) else "x")
    model = CompletionBody if field in ("suffix", "prompt_embeds") else ChatBody
    data = {"model": "m", "prompt": "p"} if model is CompletionBody else chat()
    err = refused(model, {**data, field: value})
    assert err.param == field and "not supported" in err.message


def test_unknown_fields_and_bad_values_name_the_field() -> None:
    assert refused(ChatBody, chat(lora_request={"lora_name": "x"})).param == "lora_request"
    assert refused(ChatBody, chat(lorafleet={"priority": 1})).param == "lorafleet.priority"
    assert refused(ChatBody, chat(temperature="hot")).param == "temperature"
    assert refused(ChatBody, chat(top_logprobs=2)).param == "top_logprobs"  # needs logprobs
    assert refused(ChatBody, chat(logprobs=True, top_logprobs=21)).param == "top_logprobs"
    assert refused(ChatBody, chat(n=9)).param == "n"
    assert refused(ChatBody, chat(stop=["a", "b", "c", "d", "e"])).param == "stop"
    assert refused(ChatBody, {"messages": MSGS}).param == "model"
    image = [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}]
    assert refused(ChatBody, chat(messages=[{"role": "user", "content": image}])).param == \
        "messages.0.content"
    # Content parts are validated lazily by pydantic: a bad part must still be a 400.
    assert refused(ChatBody, chat(messages=[{"role": "user", "content": {"a": 1}}])).param == \
        "messages.0.content"
    assert refused(ChatBody, chat(temperature=float("nan"))).param == "temperature"
    big = {"type": "object", "description": "x" * 70_000}
    assert refused(ChatBody, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": big}})).param == "response_format"


def test_n_times_prompts_is_capped() -> None:
    ok = parse_request(CompletionBody, {"model": "m", "prompt": ["p"] * 8, "n": 8})
    assert len(ok.prompts()) * ok.n == MAX_SEQUENCES
    assert refused(CompletionBody, {"model": "m", "prompt": ["p"] * 9, "n": 8}).param == "n"
    assert refused(CompletionBody, {"model": "m", "prompt": []}).param == "prompt"
    assert parse_request(CompletionBody, {"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]


def test_logprobs_are_formatted_as_vllm_formats_them() -> None:
    # The sampled token (7) first, then the top ones by rank; -inf is floored at -9999.0.
    step = TokenLogprobs(((7, -0.5, "a"), (3, -0.25, "b"), (9, float("-inf"), None)))
    req = LogprobRequest(2, False, lambda t: f"<{t}>")
    content = chat_logprobs(req, (7, 8), (step, TokenLogprobs(())))["content"]
    assert content[0]["token"] == "a" and content[0]["logprob"] == -0.5
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["a", "b"]
    assert content[1] == {"token": "<8>", "logprob": -9999.0, "bytes": [60, 56, 62],
                          "top_logprobs": []}  # a token vLLM gave no logprob for
    lp, end = completion_logprobs(req, (7,), (step,), offset=5)
    assert lp["top_logprobs"] == [{"a": -0.5, "b": -0.25, "<9>": -9999.0}]  # sampled + top 2
    assert (lp["text_offset"], end) == ([5], 6)
    ids = LogprobRequest(1, True, lambda t: "")
    assert chat_logprobs(ids, (7,), (step,))["content"][0]["token"] == "token_id:7"
