"""The Dockerfile, checked without a Docker engine (there is none on our machines or in CI).

What is checked: it parses; the stages and targets the README and the chart name exist; every
path it copies from the build context exists and survives .dockerignore; the final stages run
as a non-root user, carry no build tools, have a HEALTHCHECK on /health and the `lorafleet`
entrypoint, whose module imports. What is not: that the image builds and starts.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

dfp = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse is not installed")

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"
FINAL_STAGES = ("gpu", "cpu")
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "git", "cmake", "clang")


def stages() -> dict[str, list[dict[str, Any]]]:
    """Instructions by stage name (FROM ... AS name), in order."""
    parser = dfp.DockerfileParser(path=str(DOCKERFILE))
    out: dict[str, list[dict[str, Any]]] = {}
    current = None
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)", ins["value"], flags=re.I)
            assert m, f"every stage is named: {ins['content']}"
            current = m.group(2)
            out[current] = [ins]
        elif current is not None and ins["instruction"] != "COMMENT":
            out[current].append(ins)
    return out


def parent(stage: list[dict[str, Any]]) -> str:
    return stage[0]["value"].split()[0]


def lineage(all_stages: dict[str, list[dict[str, Any]]], name: str) -> list[str]:
    chain = [name]
    while parent(all_stages[chain[-1]]) in all_stages:
        chain.append(parent(all_stages[chain[-1]]))
    return chain


def dockerignore() -> list[str]:
    path = REPO / ".dockerignore"
    return [ln.strip() for ln in path.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")] if path.exists() else []


def ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or rel == p or rel.startswith(p.rstrip("/") + "/")
               for p in patterns if not p.startswith("!"))


def test_stages_and_targets() -> None:
    s = stages()
    assert {"base", "builder", "builder-gpu", "builder-cpu", "cpu", "gpu"} <= set(s)
    # The default target (the last stage) is the GPU image.
    assert list(s)[-1] == "gpu"
    assert lineage(s, "cpu")[-1] == "base" and "builder" not in lineage(s, "cpu")
    assert "builder" not in lineage(s, "gpu")


def builder_runs(stage: str) -> str:
    return " ".join(i["value"] for i in stages()[stage] if i["instruction"] == "RUN")


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_builders_install_their_lock_and_nothing_else(target: str) -> None:
    # tests/unit/test_image_lock.py keeps each lock equal to pyproject.toml's requirements for
    # the target's extra plus s3; here: the builder installs that lock, and every pip install
    # takes --no-deps, so nothing outside the lock (torchvision next to torch+cpu) gets in.
    run = builder_runs(f"builder-{target}")
    assert f"-r requirements/{target}.txt" in run
    installs = re.findall(r"pip install ([^&]+)", run)
    assert [i for i in installs if "--upgrade pip" not in i and "--no-deps" not in i] == []
    assert re.search(r"pip install --no-deps \.(\s|$)", run), "the project itself, from the context"
    if target == "cpu":
        assert "https://download.pytorch.org/whl/cpu" in run


def test_both_images_carry_boto3_for_the_adapter_store() -> None:
    # The chart's serving.adapterStore (s3://) and s3:// adapter sources import boto3 at the
    # first fetch: an image without it would fail there, long after the pods came up healthy.
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("boto3") for req in extras["s3"])
    for target in FINAL_STAGES:
        assert re.search(r"^boto3==", (REPO / "requirements" / f"{target}.txt").read_text(), flags=re.M)
        run = builder_runs(f"builder-{target}")
        # Checked at build time, after the last install, so a missing dependency fails the build.
        imports = re.findall(r'python -c "import ([^"]+)"', run)
        assert imports and "boto3" in imports[-1], target
        # Not from /src, where the project's operator/ folder shadows Python's `operator`.
        assert re.search(r'cd / && python -c "import [^"]+"\s*$', run), target
        assert run.rindex("import ") > run.rindex("pip install"), target


def test_every_copied_path_exists_and_is_in_the_context() -> None:
    patterns = dockerignore()
    copied = 0
    for name, instructions in stages().items():
        for ins in instructions:
            if ins["instruction"] not in ("COPY", "ADD"):
                continue
            args = [a for a in shlex.split(ins["value"]) if not a.startswith("--")]
            if "--from=" in ins["value"]:
                continue  # copied from another stage, not from the context
            sources = args[:-1]
            matched = []
            for src in sources:
                hits = [p for p in REPO.glob(src)] if any(c in src for c in "*?[") \
                    else ([REPO / src] if (REPO / src).exists() else [])
                matched += [h for h in hits if not ignored(str(h.relative_to(REPO)), patterns)]
                if not any(c in src for c in "*?["):
                    assert hits, f"stage {name}: COPY source {src} does not exist"
                    assert not ignored(src, patterns), f"stage {name}: {src} is in .dockerignore"
            assert matched, f"stage {name}: {ins['content'].strip()} copies nothing"
            copied += 1
    assert copied >= 4


def test_copied_packages_match_pyproject() -> None:
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {p.split("/")[0] for p in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = {shlex.split(i["value"])[0] for i in stages()["builder"] if i["instruction"] == "COPY"}
    assert folders <= copied, f"pyproject packages not copied: {folders - copied}"


@pytest.mark.parametrize("stage", FINAL_STAGES)
def test_final_stage_is_non_root_slim_and_healthy(stage: str) -> None:
    s = stages()
    chain = lineage(s, stage)
    # The stage's own instructions after those of the stages it builds on (base first).
    instructions = [i for name in reversed(chain) for i in s[name]]
    users = [i["value"].split(":")[0] for i in instructions if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{stage} runs as root"
    for ins in instructions:
        if ins["instruction"] == "RUN":
            for tool in BUILD_TOOLS:
                assert not re.search(rf"apt-get install[^&]*\b{re.escape(tool)}\b", ins["value"]), \
                    f"{stage} installs {tool}"
    copies = [i["value"] for i in s[stage] if i["instruction"] == "COPY"]
    assert any("--from=builder-" in c and "/opt/venv" in c for c in copies)
    health = [i["value"] for i in instructions if i["instruction"] == "HEALTHCHECK"]
    assert health and "/health" in health[-1]
    entry = [json.loads(i["value"]) for i in instructions if i["instruction"] == "ENTRYPOINT"]
    assert entry and entry[-1] == ["lorafleet"]


def test_entrypoint_is_the_console_script_and_imports() -> None:
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["lorafleet"].split(":")
    assert module == "lorafleet.serving.cli"
    if not (REPO / "serving" / "cli.py").exists():
        pytest.skip("serving/cli.py does not exist yet (the serving part is being built)")
    mod = importlib.import_module(module)
    assert callable(getattr(mod, func))


def test_chart_runs_as_the_image_user() -> None:
    import yaml

    values = yaml.safe_load((REPO / "charts" / "lorafleet" / "values.yaml").read_text())
    s = stages()
    user = next(i["value"] for name in lineage(s, "gpu") for i in s[name]
                if i["instruction"] == "USER").split(":")[0]
    assert values["serving"]["podSecurityContext"]["runAsUser"] == int(user)
    assert values["operator"]["podSecurityContext"]["runAsUser"] == int(user)
