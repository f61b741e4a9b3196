"""Request bodies: read, parse and validate with vLLM's own OpenAI request models.

Boundary: bytes in, a validated body out (or an ``InvalidRequest`` naming the field). The
accepted fields are those of the pinned vLLM's ``ChatCompletionRequest`` and
``CompletionRequest`` (``vllm.entrypoints.openai.{chat_completion,completion}.protocol``)
plus LoRAFleet's ``lorafleet`` extension, so the surface follows vLLM release by release
instead of a hand-kept subset. Unknown fields are still refused with a 400 that names them
(vLLM itself only logs them). What this module adds to vLLM's validation:

- fields refused because of tenancy (``REFUSED``): anything that would let a request reach
  another tenant's state (a prefix-cache salt, request ids, KV-transfer parameters, raw
  engine arguments) or run client-supplied templates, embeddings or processors;
- bounds that keep one request's cost proportionate (``n``, stop strings, logprobs, prompts,
  n x prompts, the size of a structured-output constraint).

Cost (docs/decisions/0001-openai-surface.md): importing vLLM's protocol costs the ingress
about 0.4 GB of RSS and 15-19 s at start, and validating a body about 60-120 us.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VLLMChatRequest,
)
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VLLMCompletionRequest
from vllm.exceptions import VLLMClientError

from .errors import InvalidRequest, PayloadTooLarge

__all__ = [
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_PROMPTS",
    "MAX_SEQUENCES",
    "ChatBody",
    "CompletionBody",
    "LoRAFleetOptions",
    "parse_model",
    "parse_request",
    "read_json",
]

MAX_N = 8
MAX_STOP = 4
MAX_PROMPTS = 64
# Sequences one request may run (n x prompts): each is a row of the engine's batch.
MAX_SEQUENCES = 64
# vLLM's default max_logprobs; more would fail inside the engine instead of here.
MAX_LOGPROBS = 20
# A structured-output constraint is compiled by the engine for the request: bound its size.
MAX_CONSTRAINT_BYTES = 64 * 1024
MAX_CHOICES = 256

# Fields of vLLM's request models that LoRAFleet refuses when set, and why.
REFUSED: dict[str, str] = {
    "cache_salt": "the prefix cache is salted per tenant by the server",
    "priority": "there is no client-chosen priority",
    "request_id": "request ids are assigned by the server",
    "kv_transfer_params": "KV transfer is internal to the server",
    "ec_transfer_params": "encoder-cache transfer is internal to the server",
    "vllm_xargs": "raw engine arguments are internal to the server",
    "chat_template": "client-supplied chat templates are not run",
    "chat_template_kwargs": "client-supplied chat template arguments are not accepted",
    "mm_processor_kwargs": "the served model is text-only",
    "media_io_kwargs": "the served model is text-only",
    "prompt_embeds": "prompt embeddings are not accepted",
    "use_beam_search": "beam search is not supported",
    "suffix": "suffix is not supported",
    "truncate_prompt_tokens": "prompt truncation is not supported",
    "truncation_side": "prompt truncation is not supported",
    "return_token_ids": "token ids are not returned",
    "logprob_token_ids": "logprobs of chosen token ids are not supported",
    "prompt_logprobs": "prompt logprobs are not supported",
}
# The value that counts as "not set" where it is not None (a field with a default factory
# counts as set whenever the client sent it).
_UNSET: dict[str, Any] = {"priority": 0, "use_beam_search": False}


class LoRAFleetOptions(BaseModel):
    """LoRAFleet's extension fields (``extra_body={"lorafleet": {...}}`` in the SDK).

    There is no client-chosen priority: a priority every tenant may set for itself only
    orders tenants by how greedy they are, and neither vLLM's FCFS queue nor TokenFlow
    would honour it.
    """

    model_config = ConfigDict(extra="forbid")
    consumption_rate: float | None = Field(
        default=None, gt=0, le=10_000, description="Tokens/s at which the client reads the stream."
    )


class ChatBody(VLLMChatRequest):
    """vLLM's chat request plus LoRAFleet's extension."""

    lorafleet: LoRAFleetOptions | None = None

    def output_limit(self) -> int | None:
        # max_tokens is deprecated in favour of max_completion_tokens (a warning on access).
        return self.max_completion_tokens or self.__dict__.get("max_tokens")


class CompletionBody(VLLMCompletionRequest):
    """vLLM's completion request plus LoRAFleet's extension."""

    lorafleet: LoRAFleetOptions | None = None

    def output_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if p is None:
            return []
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [[int(x) for x in p]]  # type: ignore[union-attr]
        return [x if isinstance(x, str) else [int(t) for t in x] for x in p]  # type: ignore[union-attr]


_B = TypeVar("_B", ChatBody, CompletionBody)


async def read_json(request: Any, limit: int) -> Any:
    """The request body as JSON, refusing oversized bodies before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and integer literals over
        # Python's 4300-digit conversion limit; RecursionError covers deep nesting.
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        ) from e
    if _has_lone_surrogate(data):
        # JSON allows "\ud800"; it is no text the tokenizer or a UTF-8 response can carry.
        raise InvalidRequest("The request body contains an unpaired UTF-16 surrogate escape.")
    return data


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in parsed JSON is not encodable as UTF-8.

    Iterative: the parser already accepted the nesting, a recursive walk might not.
    """
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _field_names(model: type[BaseModel]) -> frozenset[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return frozenset(names)


_FIELDS = {ChatBody: _field_names(ChatBody), CompletionBody: _field_names(CompletionBody)}


_M = TypeVar("_M", bound=BaseModel)


def parse_model(model: type[_M], data: Any) -> _M:
    """Validate a JSON object as one of our own strict models (``extra="forbid"``)."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e) from e


def parse_request(model: type[_B], data: Any) -> _B:
    """Validate ``data`` as ``model``; every refusal is an ``InvalidRequest`` naming a field."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = sorted(set(data) - _FIELDS[model])
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}",
                             param=unknown[0])
    for name, reason in REFUSED.items():
        if name in data and data[name] is not None and data[name] != _UNSET.get(name):
            raise InvalidRequest(f"'{name}' is not supported by this server: {reason}.",
                                 param=name)
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e, data) from e
    except (VLLMClientError, ValueError, TypeError) as e:  # raised by vLLM's validators
        raise InvalidRequest(str(e.args[0]) if e.args else str(e),
                             param=getattr(e, "parameter", None)) from e
    _check_bounds(body)
    return body


def _in_data(loc: tuple[Any, ...], data: Any) -> list[str]:
    """The part of an error's location that exists in the body: pydantic adds the union
    member it tried (``stop.str``), which is no field a client sent."""
    path: list[str] = []
    for part in loc:
        in_dict = isinstance(data, dict) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if in_dict or in_list:
            data = data[part]
        else:
            break
        path.append(str(part))
    return path or [str(p) for p in loc[:1]]


def _invalid(e: ValidationError, data: Any = None) -> InvalidRequest:
    first = e.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    parameter = getattr(cause, "parameter", None)
    if isinstance(cause, VLLMClientError | ValueError) and isinstance(parameter, str):
        return InvalidRequest(str(cause.args[0]) if cause.args else str(cause), param=parameter)
    loc = tuple(first.get("loc", ()))
    param = ".".join(_in_data(loc, data) if data is not None else [str(p) for p in loc]) or None
    if first.get("type") == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    message = str(first.get("msg"))
    if param is None:  # a rule over several fields
        return InvalidRequest(f"Invalid request: {message}")
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param)


_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "length_penalty")


def _check_bounds(body: ChatBody | CompletionBody) -> None:
    # JSON parsers accept NaN and 1e400; vLLM's range checks compare, and NaN compares false.
    for name in _FLOATS:
        value = getattr(body, name, None)
        if value is not None and not math.isfinite(value):
            raise InvalidRequest(f"'{name}' must be a finite number.", param=name)
    if body.logit_bias and not all(math.isfinite(v) for v in body.logit_bias.values()):
        raise InvalidRequest("'logit_bias' values must be finite numbers.", param="logit_bias")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_N}.", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP:
        raise InvalidRequest(f"At most {MAX_STOP} stop sequences.", param="stop")
    if any(not s for s in stops):
        raise InvalidRequest("Stop sequences must not be empty.", param="stop")
    limit = body.output_limit()
    if limit is not None and limit < 1:
        param = "max_completion_tokens" if isinstance(body, ChatBody) and \
            body.max_completion_tokens is not None else "max_tokens"
        raise InvalidRequest("The output limit must be at least 1.", param=param)
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}.",
                                 param="top_logprobs")
        if body.echo:
            raise InvalidRequest("'echo' is not supported for chat completions.", param="echo")
        _check_messages(body)
    else:
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"'logprobs' must be between 0 and {MAX_LOGPROBS}.",
                                 param="logprobs")
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequest("The prompt must not be empty.", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequest(f"At most {MAX_PROMPTS} prompts in one request.", param="prompt")
        if n * len(prompts) > MAX_SEQUENCES:
            raise InvalidRequest(f"n x prompts must be at most {MAX_SEQUENCES}.", param="n")
    _check_constraint(body)


def _check_messages(body: ChatBody) -> None:
    if not body.messages:
        raise InvalidRequest("'messages' must not be empty.", param="messages")
    for i, m in enumerate(body.messages):
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        # Content parts may arrive as a one-shot iterator from validation: keep a list.
        try:
            parts = list(content)
        except (ValidationError, TypeError) as e:
            raise InvalidRequest("Invalid message content.", param=f"messages.{i}.content") from e
        for part in parts:
            if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
                raise InvalidRequest("Only text content parts are supported.",
                                     param=f"messages.{i}.content")
        m["content"] = parts  # type: ignore[typeddict-item]


def _check_constraint(body: ChatBody | CompletionBody) -> None:
    """Bound what the engine must compile for this request (schema, regex, grammar)."""
    so = body.structured_outputs
    parts: list[Any] = []
    if so is not None:
        parts += [so.json, so.regex, so.grammar, so.structural_tag, so.whitespace_pattern]
        if so.choice is not None and len(so.choice) > MAX_CHOICES:
            raise InvalidRequest(f"At most {MAX_CHOICES} choices.", param="structured_outputs")
        parts.append(so.choice)
    rf = body.response_format
    if rf is not None:
        parts.append(rf.model_dump(by_alias=True))
    if isinstance(body, ChatBody) and body.tools:
        parts.append([t.model_dump() for t in body.tools])
    size = sum(len(json.dumps(p, default=str)) for p in parts if p is not None)
    if size > MAX_CONSTRAINT_BYTES:
        raise InvalidRequest(
            f"Structured-output constraints and tools are limited to {MAX_CONSTRAINT_BYTES} "
            "bytes.", param="response_format")
