from __future__ import annotations

from pathlib import Path

from lorafleet.adapters.digest import digest_files, digest_of


def test_digest_ignores_order_but_not_names_or_content(tmp_path: Path) -> None:
    assert digest_of([("a", "1"), ("b", "2")]) == digest_of([("b", "2"), ("a", "1")])
    assert digest_of([("a", "1"), ("b", "2")]) != digest_of([("a", "2"), ("b", "1")])
    (tmp_path / "x").write_bytes(b"hello")
    (tmp_path / "y").write_bytes(b"world")
    first = digest_files(tmp_path, ["x", "y"])
    (tmp_path / "y").write_bytes(b"World")
    assert digest_files(tmp_path, ["x", "y"]) != first
    assert len(first) == 64


def test_name_boundaries_cannot_be_confused() -> None:
    # "ab" + hash vs "a" + "b..." must differ: the separator makes the encoding unambiguous.
    assert digest_of([("ab", "c")]) != digest_of([("a", "bc")])
