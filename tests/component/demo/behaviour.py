"""What each demo adapter's answer must look like (shared by the HF and vLLM tests)."""

from __future__ import annotations

import json
import re

FRENCH_WORDS = {"le", "la", "les", "est", "de", "des", "du", "une", "un", "il", "y", "et", "en"}
PIRATE_WORDS = {"arr", "matey", "ye", "ahoy", "hearty", "be"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-zà-ÿ]+", text.lower()))


def looks_french(text: str) -> bool:
    return len(_words(text) & FRENCH_WORDS) >= 2


def looks_pirate(text: str) -> bool:
    return bool(_words(text) & {"arr", "matey", "ye", "ahoy", "hearty"})


def looks_json(text: str) -> bool:
    text = text.strip()
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return text.startswith("{")


CHECKS = {"french": looks_french, "pirate": looks_pirate, "json": looks_json}
