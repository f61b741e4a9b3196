"""The OpenAPI document the fuzzers (and users' client generators) read is self-contained."""

from __future__ import annotations

import json
from unittest.mock import MagicMock

import schemathesis
from schemathesis import GenerationMode

from lorafleet.serving.api.app import build_app
from lorafleet.serving.api.request_policy import RequestPolicy


def test_request_schemas_resolve_and_both_fuzzing_modes_generate() -> None:
    services = MagicMock()
    services.served_model_name = "m"
    services.request_policy = RequestPolicy()
    doc = build_app(services).openapi()
    text = json.dumps(doc)
    assert "#/$defs/" not in text  # would resolve against the document root: dangling
    schema = schemathesis.openapi.from_dict(doc)
    chat = next(r.ok() for r in schema.get_all_operations()
                if r.ok().label == "POST /v1/chat/completions")
    for mode in GenerationMode:
        case = chat.as_strategy(generation_mode=mode).example()
        assert case.body is not None
