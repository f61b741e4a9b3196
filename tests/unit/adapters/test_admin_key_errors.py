"""A weak admin key stops `lorafleet serve` with one line that says what to do, no traceback.

Run as the operator of a server runs it (a subprocess); the key check comes before anything
slow (model build, Ray), so these take seconds and start no server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from adapterfiles import write_model_config


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    model = write_model_config(tmp_path / "model")
    clean = {k: v for k, v in os.environ.items() if k != "LORAFLEET_ADMIN_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.serving.cli", "serve", "--no-demo", "--model-dir",
         str(model), "--data-dir", str(tmp_path / "data"), *args],
        capture_output=True, text=True, timeout=120, env={**clean, **(env or {})})


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafleet serve: error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_short_admin_key_given_is_one_clear_line(how: str, tmp_path: Path) -> None:
    key = "short-admin-key"
    done = serve(tmp_path, *(["--admin-key", key] if how == "flag" else []),
                 env={"LORAFLEET_ADMIN_KEY": key} if how == "env" else None)
    assert_one_line_error(done, "15 characters", "at least 32", "LORAFLEET_ADMIN_KEY")
    assert key not in done.stderr  # the key itself is never echoed


def test_a_short_key_in_the_key_file_names_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    key_file = data / "admin.key"
    key_file.write_text("admin\n")
    key_file.chmod(0o600)
    done = serve(tmp_path)
    assert_one_line_error(done, str(key_file), "remove the file")
