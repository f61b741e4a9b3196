"""The serving image's lock files agree with pyproject.toml (no network: both are read as text).

`make lock` writes requirements/cpu.txt and requirements/gpu.txt with uv; the Dockerfile installs
them with --no-deps, so what the lock pins is exactly what the image holds. A requirement changed
in pyproject.toml without `make lock` would otherwise reach the image only as the stale pin.
Checked: every requirement of the image's extras (markers evaluated for the image: CPython 3.11
on x86-64 Linux) has a pin that satisfies it; every pin the lock marks as ours is still a
requirement; the CPU lock holds torch's CPU build and none of the packages the Makefile's UNWANTED
names (CUDA builds that break `import vllm` next to torch+cpu).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
# The image: python:3.11-slim-bookworm on x86-64 (Dockerfile), as `make lock` resolves it.
IMAGE_ENV = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython"}
LOCKS = {"cpu": ("cpu", "s3"), "gpu": ("gpu", "s3")}
OURS = "lorafleet (pyproject.toml)"


def unwanted() -> set[str]:
    """The packages the Makefile keeps out of CPU environments (its UNWANTED line)."""
    line = re.search(r"^UNWANTED := (.+)$", (REPO / "Makefile").read_text(), flags=re.M)
    assert line, "Makefile names UNWANTED"
    return {canonicalize_name(n) for n in line.group(1).split()}


def read_lock(text: str) -> tuple[dict[str, str], set[str]]:
    """Pins by package name, and the names whose `via` comment names our pyproject.toml."""
    pins: dict[str, str] = {}
    ours: set[str] = set()
    current = ""
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line):
            current = canonicalize_name(m.group(1))
            pins[current] = m.group(2)
        elif line.strip().lstrip("#").strip().removeprefix("via ").strip() == OURS:
            ours.add(current)
    return pins, ours


def image_requirements(pyproject: dict[str, Any], extras: tuple[str, ...]) -> list[Requirement]:
    project = pyproject["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None
            or any(r.marker.evaluate({**IMAGE_ENV, "extra": e}) for e in ("", *extras))]


def lock_mismatches(pyproject: dict[str, Any], lock: str, extras: tuple[str, ...],
                    excluded: set[str]) -> list[str]:
    """What makes the lock disagree with pyproject.toml, one line each; empty when they agree."""
    pins, ours = read_lock(lock)
    wanted = {canonicalize_name(r.name): r for r in image_requirements(pyproject, extras)}
    out = []
    for name, req in sorted(wanted.items()):
        if name in excluded:
            out.append(f"{req} is required but kept out of the lock")
        elif name not in pins:
            out.append(f"{req} has no pin")
        elif not req.specifier.contains(pins[name], prereleases=True):
            out.append(f"{req} is not satisfied by the pin {name}=={pins[name]}")
    out += [f"{name}=={pins[name]} is pinned as ours but no longer required"
            for name in sorted(ours - set(wanted))]
    return out


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_agrees_with_pyproject(lock: str) -> None:
    text = (REPO / "requirements" / f"{lock}.txt").read_text()
    excluded = unwanted() if lock == "cpu" else set()
    assert lock_mismatches(pyproject(), text, LOCKS[lock], excluded) == [], "run `make lock`"


def test_cpu_lock_holds_torch_cpu_and_nothing_unwanted() -> None:
    pins, _ = read_lock((REPO / "requirements" / "cpu.txt").read_text())
    assert pins["torch"].endswith("+cpu")
    assert not unwanted() & set(pins)


def test_a_changed_requirement_is_a_mismatch() -> None:
    """The check itself: a raised floor, a new dependency and a dropped one are each reported."""
    text = (REPO / "requirements" / "cpu.txt").read_text()
    project = pyproject()
    deps = project["project"]["dependencies"]
    fastapi = next(d for d in deps if d.startswith("fastapi"))
    deps[deps.index(fastapi)] = "fastapi>=999"
    deps.append("not-a-locked-package>=1")
    deps.remove(next(d for d in deps if d.startswith("kopf")))
    found = lock_mismatches(project, text, LOCKS["cpu"], unwanted())
    assert len(found) == 3
    assert found[0].startswith("fastapi>=999 is not satisfied")
    assert found[1] == "not-a-locked-package>=1 has no pin"
    assert found[2].startswith("kopf==") and found[2].endswith("no longer required")
