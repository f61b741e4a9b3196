"""OpenAI wire format: the model objects ``/v1/models`` returns.

Boundary: pydantic models only. Request bodies are vLLM's own models (``body.py``); response
bodies of generations are built by ``responses.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

# -- responses ------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
