"""The maps of the serving package name every part of it.

``serving/__init__.py``'s docstring and the `serving/` row of ``docs/contracts.md`` are where a
reader finds what lives where; a subpackage or module added without a line there is invisible.
"""

from __future__ import annotations

import re
from pathlib import Path

import lorafleet.serving

REPO = Path(__file__).resolve().parents[3]
SERVING = REPO / "serving"


def parts() -> list[str]:
    """The serving package's subpackages and modules, by name (git-tracked or not)."""
    subpackages = [p.name for p in SERVING.iterdir() if (p / "__init__.py").is_file()]
    modules = [p.stem for p in SERVING.glob("*.py") if p.stem != "__init__"]
    return sorted(subpackages + modules)


def test_the_package_docstring_names_every_part() -> None:
    doc = lorafleet.serving.__doc__ or ""
    assert [p for p in parts() if f"``{p}``" not in doc] == []


def test_the_contracts_table_names_every_part() -> None:
    row = re.search(r"^\| `serving/` \|(.+)$", (REPO / "docs" / "contracts.md").read_text(), flags=re.M)
    assert row
    listed = set(re.findall(r"`([a-z_]+)(?:/|\.py)`", row.group(1)))
    assert [p for p in parts() if p not in listed] == []
