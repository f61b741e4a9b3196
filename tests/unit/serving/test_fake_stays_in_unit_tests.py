"""The fake engine is for unit tests only: every other layer runs the real vLLM engine."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
REPO = TESTS.parent


def test_only_unit_tests_import_the_fake_engine() -> None:
    uses = re.compile(r"^\s*(from|import)\s+fakeengine\b", re.M)
    offenders = [
        str(p.relative_to(REPO)) for root in (TESTS, REPO / "serving", REPO / "adapters",
                                              REPO / "operator", REPO / "loadtest")
        for p in root.rglob("*.py")
        if uses.search(p.read_text(errors="replace")) and (TESTS / "unit") not in p.parents
    ]
    assert not offenders, f"the fake engine is used outside tests/unit: {offenders}"
