"""Chart values that harden a deployment (issue 19), rendered by real Helm (no cluster).

Adapter intake bounds: every `IntakeSettings` field is a chart value with the model's default,
and what the chart renders is what `IntakeSettings` reads in each serving container.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
jsonschema = pytest.importorskip("jsonschema")

from lorafleet.adapters.sandbox import IntakeSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "lorafleet"
RELEASE, NAMESPACE = "lf", "ai"
S3_STORE = {"url": "s3://lorafleet-adapters/prod"}
MODES = {"deployment": {}, "rayservice": {"serving": {"mode": "rayservice",
                                                      "adapterStore": S3_STORE}}}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [d for path, text in sorted(files.items()) if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
                else v
    return out


def serving_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container that runs LoRAFleet serving code (Deployment, Ray head and workers)."""
    out = []
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-serving"):
            out += d["spec"]["template"]["spec"]["containers"]
        elif d["kind"] == "RayService":
            cluster = d["spec"]["rayClusterConfig"]
            out += cluster["headGroupSpec"]["template"]["spec"]["containers"]
            for group in cluster["workerGroupSpecs"]:
                out += group["template"]["spec"]["containers"]
    assert out
    return out


def values_yaml() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema_errors(values: dict[str, Any]) -> list[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(
        merged(values_yaml(), values))]


# --- adapter intake bounds -----------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.upper() if w == "s" else w.title() for w in rest)


def test_every_intake_setting_is_a_chart_value_with_its_default() -> None:
    chart = values_yaml()["serving"]["intake"]
    fields = IntakeSettings.model_fields
    assert set(chart) == {_camel(n) for n in fields}
    for name, field in fields.items():
        default = field.get_default()
        assert chart[_camel(name)] == (list(default) if isinstance(default, tuple) else default)


def _intake_from(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> IntakeSettings:
    env = {e["name"]: e["value"] for e in container["env"]
           if e["name"].startswith("LORAFLEET_INTAKE_")}
    assert len(env) == len(IntakeSettings.model_fields)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return IntakeSettings()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_intake_values_reach_every_serving_container(mode: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    given = {"allowNetworks": ["10.20.0.0/16", "fd00::/8"], "fetchTimeoutS": 2.5,
             "fetchDeadlineS": 40, "deadlineS": 90, "memoryBytes": 3 << 30, "maxConcurrent": 4}
    for container in serving_containers(render(merged(MODES[mode],
                                                      {"serving": {"intake": given}}))):
        assert _intake_from(container, monkeypatch) == IntakeSettings(
            allow_networks=("10.20.0.0/16", "fd00::/8"), fetch_timeout_s=2.5,
            fetch_deadline_s=40, deadline_s=90, memory_bytes=3 << 30, max_concurrent=4)
    for container in serving_containers(render(MODES[mode])):
        assert _intake_from(container, monkeypatch) == IntakeSettings.model_construct(
            **{n: f.get_default() for n, f in IntakeSettings.model_fields.items()})


@pytest.mark.parametrize("bad", [
    {"allowNetworks": ["not a network"]}, {"memoryBytes": 1024}, {"maxConcurrent": 0},
    {"deadlineS": 0}, {"unknown": 1},
])
def test_schema_refuses_bad_intake_values(bad: dict[str, Any]) -> None:
    assert schema_errors({"serving": {"intake": bad}})
