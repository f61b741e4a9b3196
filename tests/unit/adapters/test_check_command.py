"""`lorafleet adapter check`: a tenant's offline verdict is the server's intake verdict.

The command is run as a user runs it (a subprocess, no server); it must refuse each adapter of
the hostile corpus with the code intake gives it, accept the demo adapter, and stay within the
intake bounds that `LORAFLEET_INTAKE_*` set.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from adapterfiles import DEMO_ADAPTERS, hostile_corpus, write_model_config

from lorafleet.adapters.digest import digest_files

CLI = [sys.executable, "-m", "lorafleet.serving.cli", "adapter", "check"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_config(tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return hostile_corpus(tmp_path_factory.mktemp("corpus"))


def check(source: str | Path, model_dir: Path, *extra: str,
          env: dict[str, str] | None = None) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run([*CLI, str(source), "--model-dir", str(model_dir), *extra],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_the_demo_adapter_is_valid(model_dir: Path) -> None:
    status, out, _ = check(DEMO_ADAPTERS / "french", model_dir, "--json")
    assert status == 0, out
    verdict = json.loads(out)
    assert verdict["verdict"] == "valid" and verdict["rank"] == 8
    assert verdict["digest"] == digest_files(
        DEMO_ADAPTERS / "french", ["adapter_config.json", "adapter_model.safetensors"])


CASES = ["pickle", "traversal", "wrong-base", "rank-too-large", "deep-json",
         "backtracking-targets", "tar-long-name"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_adapters_are_refused_with_intakes_code(
        case: str, corpus: dict[str, tuple[Path, str]], model_dir: Path) -> None:
    path, code = corpus[case]
    status, out, took = check(path, model_dir)
    assert status == 1, out
    assert out.startswith(f"refused ({code}): "), out
    # The verdict is short and names no path of the machine that checked it.
    assert len(out) < 400 and str(path.parent) not in out and "lorafleet-check-" not in out
    assert took < 30, f"{case} took {took:.1f} s"


def test_a_wrong_served_name_is_the_wrong_base(model_dir: Path) -> None:
    status, out, _ = check(DEMO_ADAPTERS / "french", model_dir, "--served-model-name", "other")
    assert status == 1 and out.startswith("refused (wrong_base_model)"), out


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_intake_settings_bound_the_check(silent_server: int, model_dir: Path) -> None:
    """LORAFLEET_INTAKE_* reach the check: the loopback source is allowed and the fetch ends
    at the configured deadline with "retry may help" (3), not after the 300 s default."""
    env = {"LORAFLEET_INTAKE_ALLOW_NETWORKS": '["127.0.0.0/8"]',
           "LORAFLEET_INTAKE_FETCH_TIMEOUT_S": "1", "LORAFLEET_INTAKE_FETCH_DEADLINE_S": "2",
           "LORAFLEET_INTAKE_DEADLINE_S": "4"}
    status, out, took = check(f"http://127.0.0.1:{silent_server}/a.tar.gz", model_dir,
                              "--json", env=env)
    assert status == 3, out
    assert json.loads(out)["transient"] is True
    assert took < 15, took
    status, out, _ = check(f"http://127.0.0.1:{silent_server}/a.tar.gz", model_dir)
    assert status == 1 and "loopback" in out, out  # without the allowlist: refused at once


def test_bad_intake_settings_are_a_usage_error(model_dir: Path) -> None:
    status, out, _ = check(DEMO_ADAPTERS / "french", model_dir,
                           env={"LORAFLEET_INTAKE_ALLOW_NETWORKS": '["10.0.0.0/33"]'})
    assert status == 2 and "Traceback" not in out, out
