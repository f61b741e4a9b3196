"""Tool calling: constrain forced calls, read tool calls out of the output, stream them.

Boundary: one chat body and its generated text in, OpenAI ``tool_calls`` out. vLLM's own
pieces do the work: ``get_json_schema_from_tools`` turns a named or ``required`` tool choice
into a JSON schema, ``extract_*_tool_call_streaming`` builds streamed deltas, and its tool
parser registry (``ToolParserManager``) reads ``auto`` calls in the base model's format (the
deployment names the parser: ``RequestPolicy.tool_call_parser``).

Beyond stock vLLM: a named or ``required`` tool choice is always decoded under the schema
(structured outputs), whatever the parser, so the arguments of a forced call always parse and
validate against the function's ``parameters``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError
from vllm.entrypoints.generate.base.protocol import FunctionDefinition
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionNamedToolChoiceParam
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.sampling_params import StructuredOutputsParams
from vllm.tool_parsers.abstract_tool_parser import ToolParserManager
from vllm.tool_parsers.streaming import (
    extract_named_tool_call_streaming,
    extract_required_tool_call_streaming,
)
from vllm.tool_parsers.utils import get_json_schema_from_tools

from .body import ChatBody
from .errors import InvalidRequest

__all__ = ["ToolCalls", "constrain", "tool_mode"]

ToolMode = Literal["none", "named", "required", "auto"]
_CALLS = TypeAdapter(list[FunctionDefinition])


def tool_mode(body: ChatBody) -> ToolMode:
    if not body.tools or body.tool_choice in (None, "none"):
        return "none"
    if isinstance(body.tool_choice, ChatCompletionNamedToolChoiceParam):
        return "named"
    return "required" if body.tool_choice == "required" else "auto"


def constrain(body: ChatBody, parser: str | None) -> None:
    """Decode a named or required tool choice under its JSON schema; refuse ``auto`` when
    the deployment names no tool parser (as ``vllm serve`` does without one)."""
    mode = tool_mode(body)
    if mode == "auto" and parser is None:
        raise InvalidRequest('"auto" tool choice is not enabled on this server (no tool call '
                             'parser is configured); use "required" or a named tool.',
                             param="tool_choice")
    if mode not in ("named", "required"):
        return
    schema = get_json_schema_from_tools(tool_choice=body.tool_choice,  # type: ignore[arg-type]
                                        tools=body.tools,  # type: ignore[arg-type]
                                        parallel_tool_calls=body.parallel_tool_calls)
    if schema is not None:
        body.structured_outputs = StructuredOutputsParams(json=schema)
        body.response_format = None


class ToolCalls:
    """Tool calls of one choice: streamed as the text arrives, or read from the whole text."""

    def __init__(self, body: ChatBody, parser: str | None, tokenizer: Any) -> None:
        self.body = body
        self.mode = tool_mode(body)
        self.tokenizer = tokenizer
        self._parser = (ToolParserManager.get_tool_parser(parser)(tokenizer, body.tools)
                        if self.mode == "auto" and parser else None)
        self._text = ""
        self._named_sent = False
        self.called = False

    @property
    def streams_calls(self) -> bool:
        """Whether streamed text goes out as tool-call deltas instead of content."""
        return self.mode in ("named", "required")

    def function_name(self) -> str:
        assert isinstance(self.body.tool_choice, ChatCompletionNamedToolChoiceParam)
        return self.body.tool_choice.function.name

    def stream(self, delta_text: str) -> list[dict[str, Any]] | None:
        """The ``tool_calls`` of a streamed delta for this text (None: nothing to send)."""
        previous, self._text = self._text, self._text + delta_text
        if self.mode == "named":
            if not delta_text:
                return None
            msg, self._named_sent = extract_named_tool_call_streaming(
                delta_text=delta_text, function_name=self.function_name(),
                function_name_returned=self._named_sent, tool_call_idx=None,
                tool_call_id_type="random", tokenizer=self.tokenizer)
        else:
            msg, _ = extract_required_tool_call_streaming(
                previous_text=previous, current_text=self._text, tool_call_idx=None,
                tool_call_id_type="random")
        if msg is None or not msg.tool_calls:
            return None
        self.called = True
        return [c.model_dump(exclude_none=True) for c in msg.tool_calls]

    def final(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool_calls) of the whole output, as the message carries them."""
        calls: list[dict[str, Any]] = []
        content: str | None = text
        if self.mode == "named":
            if text.strip():
                calls.append(_call(self.function_name(), text))
            content = ""
        elif self.mode == "required":
            try:
                parsed = _CALLS.validate_json(text or "")
            except ValidationError:
                parsed = []
            calls = [_call(c.name, json.dumps(c.parameters, ensure_ascii=False)) for c in parsed]
            content = ""
        elif self._parser is not None:
            info = self._parser.extract_tool_calls(text, request=self.body)  # type: ignore[arg-type]
            if info.tools_called:
                calls = [{"id": c.id, "type": "function",
                          "function": {"name": c.function.name,
                                       "arguments": c.function.arguments}}
                         for c in info.tool_calls]
                content = info.content
        if calls and self.body.parallel_tool_calls is False:
            calls = calls[:1]
        self.called = bool(calls)
        return content, (calls if self.mode != "none" else None)


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": make_tool_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}
