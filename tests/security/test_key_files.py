"""Key files are private from their first byte; weak admin keys are refused (issue 19,
item 16). No server: the functions that write the admin key and the demo keys.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.adapters.keyfiles import WeakAdminKey, load_or_create_admin_key
from lorafleet.serving.seed import keys_file


@pytest.fixture
def observed_modes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Every mode a file had just before a chmod, and every mode a file was created with.

    The usual umask (022): a file written and then chmod'ed was 0644 in between.
    """
    seen: list[tuple[str, int]] = []
    real_chmod, real_path_chmod, real_open = os.chmod, pathlib.Path.chmod, os.open

    def chmod(path: Any, mode: int, *args: Any, **kw: Any) -> None:
        if os.path.isfile(path):
            seen.append((str(path), stat.S_IMODE(os.stat(path).st_mode)))
        real_chmod(path, mode, *args, **kw)

    def path_chmod(self: Path, mode: int, **kw: Any) -> None:
        if self.is_file():
            seen.append((str(self), stat.S_IMODE(self.stat().st_mode)))
        real_path_chmod(self, mode, **kw)

    def open_(path: Any, flags: int, mode: int = 0o777, *args: Any, **kw: Any) -> int:
        if flags & os.O_CREAT:
            seen.append((str(path), mode & ~0o022))
        return real_open(path, flags, mode, *args, **kw)

    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(pathlib.Path, "chmod", path_chmod)
    monkeypatch.setattr(os, "open", open_)
    old_umask = os.umask(0o022)
    try:
        yield seen
    finally:
        os.umask(old_umask)


def test_the_admin_key_file_is_never_readable_by_others(
        tmp_path: Path, observed_modes: list[tuple[str, int]]) -> None:
    key = load_or_create_admin_key(tmp_path, None)
    path = tmp_path / "admin.key"
    assert path.read_text().strip() == key and len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    broad = [(p, oct(m)) for p, m in observed_modes if m & 0o077]
    assert broad == [], f"a key file was readable by others: {broad}"
    assert load_or_create_admin_key(tmp_path, None) == key  # the next start reads it back


def test_the_demo_keys_file_is_never_readable_by_others(
        tmp_path: Path, observed_modes: list[tuple[str, int]]) -> None:
    from lorafleet.adapters.keyfiles import write_private_file

    for keys in ({"alice": "lf_1"}, {"alice": "lf_2"}):  # written, then rewritten
        write_private_file(keys_file(tmp_path), json.dumps(keys), replace=True)
        assert json.loads(keys_file(tmp_path).read_text()) == keys
    assert stat.S_IMODE(keys_file(tmp_path).stat().st_mode) == 0o600
    assert [m for _, m in observed_modes if m & 0o077] == []
    assert [p.name for p in tmp_path.iterdir()] == [keys_file(tmp_path).name]  # no temp left


@pytest.mark.parametrize("key", ["admin", "test-admin-key", "x" * 31])
def test_a_weak_admin_key_is_refused(key: str, tmp_path: Path) -> None:
    with pytest.raises(WeakAdminKey, match="at least 32"):
        load_or_create_admin_key(tmp_path, key)
    (tmp_path / "admin.key").write_text(key + "\n")  # a weak key written by hand
    with pytest.raises(WeakAdminKey):
        load_or_create_admin_key(tmp_path, None)


def test_a_strong_given_key_is_used_as_is(tmp_path: Path) -> None:
    key = "k" * 32
    assert load_or_create_admin_key(tmp_path, key) == key
    assert not (tmp_path / "admin.key").exists()


def test_a_planted_symlink_is_neither_written_through_nor_read(tmp_path: Path) -> None:
    target = tmp_path / "attacker-readable"
    target.write_text("A" * 40 + "\n")
    (tmp_path / "data").mkdir()
    os.symlink(target, tmp_path / "data" / "admin.key")
    with pytest.raises(OSError):
        load_or_create_admin_key(tmp_path / "data", None)
    assert target.read_text() == "A" * 40 + "\n"


def test_a_loose_existing_key_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "admin.key"
    path.write_text("k" * 40 + "\n")
    path.chmod(0o644)
    assert load_or_create_admin_key(tmp_path, None) == "k" * 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
