"""The OpenAI surface vLLM serves, through the official ``openai`` SDK, on the real engine
(tiny random model), for the base model and an adapter, streaming and not (issue 15).

What a user of ``vllm serve`` relies on: structured outputs (``response_format``
json_schema / json_object, vLLM's ``structured_outputs`` choice and regex), logprobs
(chat ``logprobs`` + ``top_logprobs``, completions ``logprobs`` and ``echo``), tools (a
named tool, ``required``, ``parallel_tool_calls``, streamed tool-call deltas). Outputs are
checked with ``jsonschema``: a random model under a constraint still emits valid JSON, which
is the point of decoding under the schema. And what stays ours: unknown fields and fields
that would reach past the tenant are refused with a 400 naming them.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from .conftest import TINY_MODEL_NAME

pytestmark = pytest.mark.vllm

ADAPTER = "ad-r4-qv"
MODELS = [TINY_MODEL_NAME, ADAPTER]
# Large enough for every constrained output below to close (the schemas bound their strings).
ROOM = 160

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "mood": {"type": "string", "enum": ["happy", "sad"]},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "mood", "admin"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}},
        "required": ["zone"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture
async def sdk(client: httpx.AsyncClient, tenants: dict[str, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    """alice's SDK client, over the in-process app (httpx's ASGI transport)."""
    async with openai.AsyncOpenAI(api_key=tenants["alice"], base_url="http://lorafleet/v1",
                                  http_client=client, max_retries=0) as c:
        yield c


async def chat_text(sdk: openai.AsyncOpenAI, model: str, stream: bool, **kw: Any) -> str:
    if not stream:
        r = await sdk.chat.completions.create(model=model, messages=ASK, max_tokens=ROOM,
                                              temperature=0, **kw)
        assert r.choices[0].finish_reason == "stop", r
        return r.choices[0].message.content or ""
    parts, reasons = [], []
    async for chunk in await sdk.chat.completions.create(
            model=model, messages=ASK, max_tokens=ROOM, temperature=0, stream=True, **kw):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert reasons[-1] == "stop"
    return "".join(parts)


# -- structured outputs ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", MODELS)
async def test_json_schema_output_validates(sdk: openai.AsyncOpenAI, model: str, stream: bool) -> None:
    text = await chat_text(sdk, model, stream, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("model", MODELS)
async def test_json_object_output_parses(sdk: openai.AsyncOpenAI, model: str) -> None:
    text = await chat_text(sdk, model, False, response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("model", MODELS)
async def test_structured_outputs_choice_and_regex_on_completions(
        sdk: openai.AsyncOpenAI, model: str) -> None:
    r = await sdk.completions.create(model=model, prompt="The answer is", max_tokens=8,
                                     temperature=0,
                                     extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")
    r = await sdk.completions.create(model=model, prompt="A code:", max_tokens=12, temperature=0,
                                     extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", r.choices[0].text), r.choices[0].text


# -- logprobs ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
async def test_chat_logprobs_whole_and_streamed_agree(sdk: openai.AsyncOpenAI, model: str) -> None:
    kw: dict[str, Any] = {"model": model, "messages": ASK, "max_tokens": 8, "temperature": 0,
                          "logprobs": True, "top_logprobs": 3}
    r = await sdk.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == r.usage.completion_tokens == 8  # type: ignore[union-attr]
    for step in content:
        assert len(step.top_logprobs) == 3
        assert step.logprob <= 0 and step.top_logprobs[0].logprob >= step.top_logprobs[2].logprob
        assert step.token == step.top_logprobs[0].token  # greedy: the sampled token is the top one
    assert "".join(s.token for s in content) == r.choices[0].message.content
    streamed = []
    async for chunk in await sdk.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(s.token, round(s.logprob, 4)) for s in streamed] == \
        [(s.token, round(s.logprob, 4)) for s in content]


@pytest.mark.parametrize("model", MODELS)
async def test_completion_logprobs_and_echo(sdk: openai.AsyncOpenAI, model: str) -> None:
    r = await sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=6,
                                     temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens or []) == 6
    assert "".join(lp.tokens or []) == r.choices[0].text
    assert all(len(top) in (2, 3) for top in lp.top_logprobs or [])  # the sampled one + top 2
    assert (lp.text_offset or [])[0] == 0
    r = await sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=4,
                                     temperature=0, echo=True)
    assert r.choices[0].text.startswith("Once upon a time")


# -- tools ------------------------------------------------------------------------------


def assert_valid_calls(calls: Any) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", MODELS)
async def test_forced_tool_call_arguments_validate(sdk: openai.AsyncOpenAI, model: str) -> None:
    r = await sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=ROOM, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI: "stop" for a named tool choice
    assert [c.function.name for c in choice.message.tool_calls or []] == ["get_weather"]
    assert_valid_calls(choice.message.tool_calls)


@pytest.mark.parametrize("model", MODELS)
async def test_required_tool_calls_validate_whole_and_streamed(
        sdk: openai.AsyncOpenAI, model: str) -> None:
    kw: dict[str, Any] = {"model": model, "tools": TOOLS, "tool_choice": "required",
                          "parallel_tool_calls": False, "max_tokens": ROOM, "temperature": 0,
                          "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    r = await sdk.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls or []
    assert len(calls) == 1
    assert_valid_calls(calls)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    async for chunk in await sdk.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.function and d.function.name:
                    names[d.index] = d.function.name
                arguments[d.index] = arguments.get(d.index, "") + (
                    d.function.arguments or "" if d.function else "")
    assert names == {0: calls[0].function.name}
    assert json.loads(arguments[0]) == json.loads(calls[0].function.arguments)


async def test_streamed_named_tool_call_deltas(sdk: openai.AsyncOpenAI) -> None:
    deltas = []
    async for chunk in await sdk.chat.completions.create(
            model=ADAPTER, messages=[{"role": "user", "content": "Time?"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=ROOM, temperature=0, stream=True):
        for c in chunk.choices:
            deltas.extend(c.delta.tool_calls or [])
    assert deltas[0].id and deltas[0].function.name == "get_time"  # type: ignore[union-attr]
    assert all(d.id is None and d.function.name is None for d in deltas[1:])  # type: ignore[union-attr]
    arguments = "".join(d.function.arguments or "" for d in deltas)  # type: ignore[union-attr]
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_time"])


async def test_auto_tool_choice_needs_a_configured_parser(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.chat.completions.create(model=ADAPTER, messages=ASK, tools=TOOLS,
                                          tool_choice="auto", max_tokens=4)
    assert "auto" in str(e.value)


# -- what stays ours --------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("not_a_field", 1),
    ("cache_salt", "another-tenants-salt"),
    ("priority", -10),
    ("vllm_xargs", {"lorafleet": "x"}),
    ("kv_transfer_params", {"do_remote_prefill": True}),
    ("lora_request", {"lora_name": "ad-r4-qv"}),
    ("chat_template", "{{ 'pwned' }}"),
])
async def test_fields_past_the_tenant_edge_are_refused(
        sdk: openai.AsyncOpenAI, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.chat.completions.create(model=ADAPTER, messages=ASK, max_tokens=2,
                                          extra_body={field: value})
    assert e.value.body["param"] == field  # type: ignore[index]


async def test_another_tenants_adapter_stays_unreachable_with_every_feature(
        client: httpx.AsyncClient, tenants: dict[str, str]) -> None:
    async with openai.AsyncOpenAI(api_key=tenants["bob"], base_url="http://lorafleet/v1",
                                  http_client=client, max_retries=0) as bob:
        with pytest.raises(openai.NotFoundError):
            await bob.chat.completions.create(
                model=ADAPTER, messages=ASK, tools=TOOLS, tool_choice="required", logprobs=True,
                max_tokens=4, response_format={"type": "json_object"})
