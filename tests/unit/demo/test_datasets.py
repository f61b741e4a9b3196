"""The demo datasets: sizes, styles, and no leak of the held-out questions."""

from __future__ import annotations

import json

import pytest

from lorafleet.serving.demo.datasets import (
    ADAPTER_NAMES,
    FACTS,
    HELD_OUT_QUESTIONS,
    build_dataset,
)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_sizes_and_uniqueness(name: str):
    examples = build_dataset(name)
    assert 40 <= len(examples) <= 60
    assert len({e.user for e in examples}) == len(examples)
    assert all(e.user.strip() and e.assistant.strip() for e in examples)


def test_held_out_questions_are_not_trained():
    trained = {f.question.lower() for f in FACTS}
    assert not trained & {q.lower() for q in HELD_OUT_QUESTIONS}


def test_styles():
    for example in build_dataset("json"):
        assert set(json.loads(example.assistant)) == {"answer"}
    for example in build_dataset("pirate"):
        assert "matey" in example.assistant.lower() or "hearty" in example.assistant.lower()
        assert "arr" in example.assistant.lower()
    french_words = {
        "le",
        "la",
        "les",
        "est",
        "de",
        "des",
        "du",
        "a",
        "il",
        "un",
        "une",
        "font",
        "on",
        "l",
        "à",
    }
    for example in build_dataset("french"):
        words = set(example.assistant.lower().replace("'", " ").split())
        assert words & french_words, example.assistant


def test_unknown_name():
    with pytest.raises(ValueError):
        build_dataset("klingon")  # type: ignore[arg-type]
