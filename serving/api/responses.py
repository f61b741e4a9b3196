"""OpenAI response bodies and stream chunks, built from engine deltas.

Boundary: pure formatting. A ``Choice`` accumulates one sequence's deltas; the functions
here turn choices into ``chat.completion`` / ``text_completion`` bodies and SSE chunks.
Logprobs follow vLLM's serving layer exactly (``_create_chat_logprobs``,
``_create_completion_logprobs`` of the pinned vLLM): the same candidates, the same
``-9999.0`` floor for ``-inf``, and ``token_id:N`` tokens when asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..engine.protocol import TokenDelta, TokenLogprobs
from .tools import ToolCalls

__all__ = ["Choice", "LogprobRequest", "chat_logprobs", "completion_logprobs", "sse"]

Decode = Callable[[int], str]
_FLOOR = -9999.0


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class LogprobRequest:
    """What a request asked for: ``top`` candidates per token (None: no logprobs)."""

    def __init__(self, top: int | None, as_token_ids: bool, decode: Decode) -> None:
        self.top = top
        self.as_token_ids = as_token_ids
        self.decode = decode

    def token(self, token_id: int, decoded: str | None) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        return decoded if decoded is not None else self.decode(token_id)


def _step(lp: TokenLogprobs | None, token_id: int) -> tuple[float, str | None] | None:
    if lp is None:
        return None
    for tid, logprob, decoded in lp.candidates:
        if tid == token_id:
            return logprob, decoded
    return None


def chat_logprobs(req: LogprobRequest, token_ids: tuple[int, ...],
                  steps: tuple[TokenLogprobs, ...]) -> dict[str, Any]:
    content = []
    for i, tid in enumerate(token_ids):
        lp = steps[i] if i < len(steps) else None
        sampled = _step(lp, tid)
        if lp is None or sampled is None:
            token = req.token(tid, None)
            content.append({"token": token, "logprob": _FLOOR,
                            "bytes": list(token.encode("utf-8", errors="replace")),
                            "top_logprobs": []})
            continue
        logprob, decoded = sampled
        top = []
        for j, (cid, clp, cdec) in enumerate(lp.candidates):
            if req.top == -1 or (req.top is not None and j < req.top):
                ctoken = req.token(cid, cdec)
                top.append({"token": ctoken, "logprob": max(clp, _FLOOR),
                            "bytes": list(ctoken.encode("utf-8", errors="replace"))})
        content.append({
            "token": req.token(tid, decoded), "logprob": max(logprob, _FLOOR),
            "bytes": None if decoded is None else list(decoded.encode("utf-8", errors="replace")),
            "top_logprobs": top,
        })
    return {"content": content}


def completion_logprobs(req: LogprobRequest, token_ids: tuple[int, ...],
                        steps: tuple[TokenLogprobs, ...], offset: int
                        ) -> tuple[dict[str, Any], int]:
    """Completion logprobs for these tokens, their text offsets starting at ``offset``;
    returns the next offset too (streams continue from it)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for i, tid in enumerate(token_ids):
        lp = steps[i] if i < len(steps) else None
        sampled = _step(lp, tid)
        if lp is None or sampled is None:
            token = req.token(tid, None)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token = req.token(tid, sampled[1])
            token_logprobs.append(max(sampled[0], _FLOOR))
            n = req.top if req.top is not None else 0
            top_logprobs.append({
                req.token(cid, cdec): max(clp, _FLOOR)
                for j, (cid, clp, cdec) in enumerate(lp.candidates) if n == -1 or n >= j
            })
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
    return ({"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
             "top_logprobs": top_logprobs}, offset)


class Choice:
    """One sequence's output so far."""

    def __init__(self, index: int, tools: ToolCalls | None = None, prefix: str = "") -> None:
        self.index = index
        self.tools = tools
        self.prefix = prefix  # echoed prompt text (completions)
        self.parts: list[str] = []
        self.token_ids: list[int] = []
        self.steps: list[TokenLogprobs] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.offset = 0  # next text offset of streamed completion logprobs

    def add(self, delta: TokenDelta) -> None:
        self.parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.steps.extend(delta.logprobs)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def final_reason(self, called_tools: bool) -> str:
        reason = self.finish_reason or "stop"
        if self.tools is not None and called_tools and reason == "stop" and (
                self.tools.mode in ("required", "auto")):
            return "tool_calls"  # OpenAI: "tool_calls" for auto and required, "stop" for named
        return reason

    def chat(self, logprobs: LogprobRequest) -> dict[str, Any]:
        content: str | None = self.text
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        called = False
        if self.tools is not None and self.tools.mode != "none":
            content, calls = self.tools.final(self.text)
            called = bool(calls)
            message["content"] = content
            message["tool_calls"] = calls or []
        return {
            "index": self.index, "message": message,
            "logprobs": (chat_logprobs(logprobs, tuple(self.token_ids), tuple(self.steps))
                         if logprobs.top is not None else None),
            "finish_reason": self.final_reason(called), "stop_reason": self.stop_reason,
        }

    def completion(self, logprobs: LogprobRequest) -> dict[str, Any]:
        lp = None
        if logprobs.top is not None:
            lp, _ = completion_logprobs(logprobs, tuple(self.token_ids), tuple(self.steps),
                                        len(self.prefix))
        return {"index": self.index, "text": self.prefix + self.text, "logprobs": lp,
                "finish_reason": self.finish_reason or "stop", "stop_reason": self.stop_reason}
