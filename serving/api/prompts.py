"""Turning OpenAI messages and prompts into token ids, and checking them against the context.

Boundary: owns the tokenizer (loaded once from the model directory). The engine receives
token ids only, so the context-length check happens here, before anything is queued.

Tokenizing costs CPU in proportion to the text (up to the body limit, a megabyte), so the
routes first ask ``token_floor`` for a lower bound that needs no tokenizer: no token is
longer than the longest vocabulary entry (in UTF-8 bytes), and normalisation shrinks text
by at most ``_NORMALISATION_SHRINK``. A prompt whose floor already exceeds the context is
refused without being tokenized; the rest are tokenized off the event loop.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from jinja2 import TemplateError

from .errors import ContextLengthExceeded, InvalidRequest

# NFKC can turn a 3-byte character into a 1-byte one; 4 leaves room for any normaliser.
_NORMALISATION_SHRINK = 4


@dataclass(frozen=True)
class RenderedPrompt:
    token_ids: tuple[int, ...]
    max_tokens: int


def decide_max_tokens(prompt_len: int, requested: int | None, max_model_len: int) -> int:
    """The output limit for a prompt, or ContextLengthExceeded with OpenAI's wording."""
    if prompt_len >= max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {prompt_len} tokens. Please reduce the length of the prompt.",
            param="messages",
        )
    room = max_model_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion). Please reduce the length of the prompt or "
            "the completion.",
            param="max_tokens",
        )
    return requested


class PromptRenderer:
    """Chat template and tokenizer of the base model."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    @classmethod
    def from_model_dir(cls, model_dir: str, max_model_len: int) -> PromptRenderer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir), max_model_len)

    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @cached_property
    def max_token_bytes(self) -> int:
        """Bytes of text one token can stand for at most (its vocabulary entry, in UTF-8)."""
        vocab = self.tokenizer.get_vocab()
        return max(1, max((len(t.encode("utf-8", "replace")) for t in vocab), default=1))

    def token_floor(self, text_bytes: int) -> int:
        """At least this many tokens encode ``text_bytes`` bytes of text."""
        return text_bytes // (self.max_token_bytes * _NORMALISATION_SHRINK)

    def check_floor(self, floor: int, param: str) -> None:
        """Refuse, without tokenizing, a prompt whose token floor fills the context."""
        if floor >= self.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has at least {floor} tokens. Please reduce the length of the prompt.",
                param=param,
            )

    def check_output_limit(self, floor: int, max_tokens: int | None) -> None:
        """Refuse, before any quota check, an output limit that no prompt leaves room for: the
        request can never run, so it is a 400, not a 429 that invites a retry."""
        if max_tokens is not None and floor + max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested at least {floor + max_tokens} tokens ({floor} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the length of the prompt or "
                "the completion.",
                param="max_tokens",
            )

    def chat(self, messages: list[Any], max_tokens: int | None, *, tools: list[Any] | None = None,
             documents: list[Any] | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> RenderedPrompt:
        """Render OpenAI messages (dicts, as vLLM's request model leaves them) with the
        model's chat template, as vLLM does: text parts joined by newlines, ``developer``
        as ``system``, tool-call arguments handed to the template as objects."""
        conversation = [_template_message(m) for m in messages]
        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = tools
        if documents:
            extra["documents"] = documents
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=True, **extra,
            )
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
            # The template rejects what it cannot render (roles out of order, a tool message
            # for a model without tools, no final message to continue): the client's doing.
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise InvalidRequest(f"The chat template cannot render these messages: {reason}",
                                 param="messages") from e
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = tuple(int(t) for t in ids)
        return RenderedPrompt(ids, decide_max_tokens(len(ids), max_tokens, self.max_model_len))

    def prompt_text(self, prompt: str | list[int]) -> str:
        """The text of a completion prompt (echo): as sent, or its token ids decoded."""
        return prompt if isinstance(prompt, str) else str(self.tokenizer.decode(prompt))

    def completion(self, prompt: str | list[int], max_tokens: int | None,
                   add_special_tokens: bool = True) -> RenderedPrompt:
        if isinstance(prompt, str):
            ids = tuple(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        else:
            vocab = self.vocab_size()
            if any(t < 0 or t >= vocab for t in prompt):
                raise InvalidRequest(f"Token ids must be in [0, {vocab}).", param="prompt")
            ids = tuple(prompt)
        if not ids:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        return RenderedPrompt(ids, decide_max_tokens(len(ids), max_tokens, self.max_model_len))


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(p.get("text") or p.get("refusal") or "") for p in content)


def _template_message(m: dict[str, Any]) -> dict[str, Any]:
    role = m.get("role")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role,
                           "content": message_text(m.get("content"))}
    if m.get("name"):
        out["name"] = m["name"]
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    calls = m.get("tool_calls")
    if calls:
        out["tool_calls"] = [_template_call(c) for c in calls]
    return out


def _template_call(call: Any) -> dict[str, Any]:
    call = dict(call)
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # if not JSON, the template gets the string
            function["arguments"] = json.loads(arguments)
    call["function"] = function
    return call
