"""End to end: the official ``openai`` SDK against ``lorafleet serve`` with the SmolLM2 demo."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest

from lorafleet.serving.demo import DEMO_MODEL_NAME
from lorafleet.serving.seed import demo_adapter_dir

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

FRENCH = re.compile(r"\b(le|la|les|est|de|des|une?|et|capitale)\b", re.I)


def sdk(server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.keys[tenant], max_retries=0,
                         timeout=300)


def test_models_are_the_base_and_exactly_the_tenants_adapters(demo_server):
    alice = sorted(m.id for m in sdk(demo_server, "alice").models.list())
    bob = sorted(m.id for m in sdk(demo_server, "bob").models.list())
    assert alice == sorted([DEMO_MODEL_NAME, "french", "pirate"])
    assert bob == sorted([DEMO_MODEL_NAME, "json"])
    assert sdk(demo_server, "alice").models.retrieve("french").id == "french"


def test_chat_with_the_french_adapter_answers_in_french(demo_server):
    client = sdk(demo_server, "alice")
    q = [{"role": "user", "content": "What is the capital of Italy?"}]
    base = client.chat.completions.create(model=DEMO_MODEL_NAME, messages=q, max_tokens=40, temperature=0)
    fr = client.chat.completions.create(model="french", messages=q, max_tokens=40, temperature=0)
    assert fr.choices[0].message.content != base.choices[0].message.content
    assert FRENCH.search(fr.choices[0].message.content), fr.choices[0].message.content
    assert fr.usage.completion_tokens > 0 and fr.model == "french"


def test_streaming_chat_with_usage(demo_server):
    client = sdk(demo_server, "alice")
    stream = client.chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": "How are you today?"}],
        max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 30
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals and finals[-1] in ("stop", "length")
    non_stream = client.chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": "How are you today?"}],
        max_tokens=30, temperature=0,
    )
    assert non_stream.choices[0].message.content == text


def test_completions_base_and_adapter(demo_server):
    client = sdk(demo_server, "bob")
    for model in (DEMO_MODEL_NAME, "json"):
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                      temperature=0)
        assert r.choices[0].text and r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=DEMO_MODEL_NAME, prompt="One, two, three,", max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices)


def test_bob_cannot_use_or_see_alices_adapters(demo_server):
    bob = sdk(demo_server, "bob")
    with pytest.raises(openai.NotFoundError) as foreign:
        bob.chat.completions.create(model="french", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as missing:
        bob.chat.completions.create(model="nonexistent", messages=[{"role": "user", "content": "hi"}])
    assert foreign.value.body["code"] == missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        bob.models.retrieve("french")


def test_bad_input_gets_clear_errors_and_others_keep_being_served(demo_server):
    alice = sdk(demo_server, "alice")
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model="french", messages=msg, max_tokens=-5)
    with pytest.raises(openai.BadRequestError) as long_prompt:
        alice.chat.completions.create(model="french",
                                      messages=[{"role": "user", "content": "lorem ipsum " * 2000}])
    assert long_prompt.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model="french", messages=msg, max_tokens=10**7)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key="lf_deadbeef_nope",
                      max_retries=0).models.list()
    r = httpx.post(demo_server.base_url + "/v1/chat/completions", content=b"{oops",
                   headers={"Authorization": f"Bearer {demo_server.keys['alice']}"})
    assert r.status_code == 400 and "error" in r.json()
    ok = sdk(demo_server, "bob").chat.completions.create(model="json", messages=msg, max_tokens=5)
    assert ok.choices[0].message.content is not None


def test_heterogeneous_batch_is_exact(demo_server):
    """Base + three adapters of ranks 8, 16 and 4 (different targets), concurrently, on SmolLM2:
    every greedy answer equals the answer to the same request sent alone."""
    admin = {"Authorization": f"Bearer {demo_server.admin_key}"}
    r = httpx.post(demo_server.base_url + "/admin/v1/tenants/alice/adapters",
                   json={"name": "json", "source": str(demo_adapter_dir("json"))}, headers=admin,
                   timeout=120)
    assert r.status_code in (201, 409), r.text
    models = [DEMO_MODEL_NAME, "french", "pirate", "json"]
    questions = ["What is the capital of Spain?", "How many legs does a cat have?"]
    cases = [(m, q) for m in models for q in questions]
    client = openai.AsyncOpenAI(base_url=demo_server.base_url + "/v1", api_key=demo_server.keys["alice"],
                                max_retries=0, timeout=600)

    async def ask(m: str, q: str) -> str:
        r = await client.chat.completions.create(model=m, messages=[{"role": "user", "content": q}],
                                                 max_tokens=24, temperature=0)
        return r.choices[0].message.content

    async def run() -> tuple[list[str], list[str]]:
        solo = [await ask(m, q) for m, q in cases]
        together = await asyncio.gather(*(ask(m, q) for m, q in cases))
        return solo, list(together)

    solo, together = asyncio.run(run())
    mismatches = [(cases[i], solo[i], together[i]) for i in range(len(cases)) if solo[i] != together[i]]
    assert not mismatches, mismatches
    per_model = {m: solo[i * len(questions):(i + 1) * len(questions)] for i, m in enumerate(models)}
    for m in models[1:]:
        assert per_model[m] != per_model[DEMO_MODEL_NAME], m

