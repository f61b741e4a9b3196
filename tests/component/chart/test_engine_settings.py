"""One engine setting, one name and one default everywhere it can be set.

``config.EngineSettings`` is the declaration. Each of its fields must appear, with the same
default and the same bounds, as a ``lorafleet serve`` flag, inside the Serve app args
(``deploy.AppArgs.engine``), as a key of the chart's ``serving.engine`` values and in
``values.schema.json``; and what the chart renders from its values must reach the engine as
those values in both serving modes. A setting added to the model fails here until the chart
has it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")

from lorafleet.serving.cli import build_parser, engine_settings  # noqa: E402
from lorafleet.serving.config import EngineConfig, EngineSettings  # noqa: E402
from lorafleet.serving.deploy import AppArgs  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "lorafleet"
FIELDS = EngineSettings.model_fields

# Where each setting lives under `serving.engine` in values.yaml. The rule is the field's name
# in camelCase; the exceptions are the scheduling group and gpusPerReplica, named as users'
# values files already name them.
CHART_KEYS: dict[str, str] = {
    "scheduling_policy": "scheduling.policy",
    "default_consumption_rate": "scheduling.defaultConsumptionRate",
    "scheduling_max_running": "scheduling.maxRunning",
    "scheduling_params": "scheduling.params",
    "kv_offload_gib": "scheduling.kvOffloadGib",
    "kv_offload_disk_dir": "scheduling.kvOffloadDiskDir",
    "kv_offload_disk_gib": "scheduling.kvOffloadDiskGib",
    "num_gpus": "gpusPerReplica",
}
# serving.engine keys that are the chart's own, not engine settings: how pods are sized.
CHART_ONLY = {"replicasPerPod", "gpuResourceName"}
# The chart's default differs on purpose: it sizes the pods' GPU requests from this number, so
# it cannot be `auto`; the CUDA image it deploys by default runs one GPU per rank.
CHART_DEFAULTS = {"num_gpus": 1}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def chart_key(name: str) -> str:
    return CHART_KEYS.get(name, _camel(name))


def _default(name: str) -> Any:
    return FIELDS[name].get_default(call_default_factory=True)


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())["serving"]["engine"]


def _schema() -> dict[str, Any]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return schema["properties"]["serving"]["properties"]["engine"]


def _get(node: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        node = node[part]
    return node


def _schema_of(dotted: str) -> dict[str, Any]:
    node = _schema()
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def _bounds(name: str) -> dict[str, float]:
    """The field's numeric bounds, named as JSON schema names them."""
    out: dict[str, float] = {}
    for m in FIELDS[name].metadata:
        for attr, key in (("ge", "minimum"), ("gt", "exclusiveMinimum"),
                          ("le", "maximum"), ("lt", "exclusiveMaximum")):
            if getattr(m, attr, None) is not None:
                out[key] = getattr(m, attr)
    return out


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return None


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_setting_is_a_chart_value_with_the_models_default(name: str) -> None:
    key = chart_key(name)
    values = _values()
    try:
        chart_default = _get(values, key)
    except KeyError:
        pytest.fail(f"values.yaml has no serving.engine.{key} for EngineSettings.{name}")
    expected = CHART_DEFAULTS.get(name, _default(name))
    assert chart_default == expected, f"serving.engine.{key}: {chart_default!r} != {expected!r}"


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_setting_has_the_models_bounds_and_choices_in_the_schema(name: str) -> None:
    node = _schema_of(chart_key(name))
    for key, bound in _bounds(name).items():
        assert math.isclose(node.get(key, math.nan), bound), (name, key, node)
    choices = _literal_choices(FIELDS[name].annotation)
    if choices is not None:
        assert tuple(node["enum"]) == choices, name


def test_the_chart_has_no_engine_value_the_model_lacks() -> None:
    def leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in node.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and k != "params":
                out |= leaves(v, path + ".")
            else:
                out.add(path)
        return out

    def schema_leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in node["properties"].items():
            out |= schema_leaves(v, f"{prefix}{k}.") if "properties" in v else {prefix + k}
        return out

    declared = {chart_key(n) for n in FIELDS} | CHART_ONLY
    assert leaves(_values()) == declared
    assert schema_leaves(_schema()) == declared


def test_every_setting_is_a_flag_with_the_models_default() -> None:
    args = build_parser().parse_args(["serve"])
    for name in FIELDS:
        default = _default(name)
        assert getattr(args, name) == (sorted(default.items()) if isinstance(default, dict)
                                       else default), name
    assert engine_settings(args) == EngineSettings()


def test_the_stable_flag_names_set_their_settings() -> None:
    argv = ["serve", "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
            "--max-loras", "2", "--max-lora-rank", "16", "--max-cpu-loras", "6",
            "--kv-cache-gib", "0.5", "--scheduling-policy", "tokenflow",
            "--default-consumption-rate", "3", "--scheduling-max-running", "4",
            "--scheduling-param", "resume_margin_s=2", "--scheduling-param", "min_run_s=0.5",
            "--kv-offload-gib", "0", "--kv-offload-disk-dir", "/spill",
            "--kv-offload-disk-gib", "8", "--num-gpus", "0.5", "--tensor-parallel-size", "1",
            "--placement-strategy", "PACK"]
    s = engine_settings(build_parser().parse_args(argv))
    assert s == EngineSettings(
        dtype="float32", max_model_len=1024, max_num_seqs=8, max_loras=2, max_lora_rank=16,
        max_cpu_loras=6, kv_cache_gib=0.5, scheduling_policy="tokenflow",
        default_consumption_rate=3.0, scheduling_max_running=4,
        scheduling_params={"resume_margin_s": 2.0, "min_run_s": 0.5}, kv_offload_gib=0.0,
        kv_offload_disk_dir="/spill", kv_offload_disk_gib=8.0, num_gpus=0.5,
        tensor_parallel_size=1, placement_strategy="PACK")
    config = EngineConfig.of(s, model_dir="/m", served_model_name="m")
    assert (config.kv_cache_bytes, config.kv_offload_host_bytes, config.kv_offload_disk_bytes) \
        == (2**29, 0, 8 * 2**30)


def test_app_args_nest_the_same_settings() -> None:
    assert AppArgs(model_dir="/m", served_model_name="m").engine == EngineSettings()
    flat = AppArgs(model_dir="/m", served_model_name="m", max_num_seqs=8, kv_offload_disk_dir="/d")
    nested = AppArgs(model_dir="/m", served_model_name="m",
                     engine={"max_num_seqs": 8, "kv_offload_disk_dir": "/d"})
    assert flat == nested and nested.engine_config().max_num_seqs == 8
    with pytest.raises(ValueError, match="both"):
        AppArgs(model_dir="/m", served_model_name="m", max_loras=2, engine={"max_loras": 3})


# -- what the chart renders reaches the engine ------------------------------------------------

NON_DEFAULT = {
    "dtype": "float32", "maxModelLen": 1024, "maxNumSeqs": 8, "maxLoras": 2, "maxLoraRank": 16,
    "maxCpuLoras": 6, "loraSlotWaitS": 3.5, "loraTenantSlotShare": 0.25,
    "kvCacheGib": 0.5, "gpusPerReplica": 0, "tensorParallelSize": 1,
    "placementStrategy": "PACK",
    "scheduling": {"policy": "tokenflow", "defaultConsumptionRate": 3, "maxRunning": 4,
                   "params": {"resume_margin_s": 2}, "kvOffloadGib": 0.25,
                   "kvOffloadDiskDir": "/data/kv", "kvOffloadDiskGib": 8},
}
S3_STORE = {"url": "s3://lorafleet-adapters/prod"}


def _rendered_settings(mode: str, engine: dict[str, Any]) -> EngineSettings:
    values = {"serving": {"mode": mode, "engine": engine, "adapterStore": S3_STORE}}
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name="lf", namespace="ai", is_install=True)
    docs = [d for path, text in files.items() if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
    if mode == "rayservice":
        (rs,) = [d for d in docs if d["kind"] == "RayService"]
        (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
        return AppArgs(**app["args"]).engine
    (dep,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-serving")]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return engine_settings(build_parser().parse_args(container["args"]))


@pytest.mark.parametrize("mode", ["deployment", "rayservice"])
def test_chart_defaults_reach_the_engine_as_the_models_defaults(mode: str) -> None:
    expected = EngineSettings(**{n: v for n, v in CHART_DEFAULTS.items()})
    assert _rendered_settings(mode, {}) == expected


@pytest.mark.parametrize("mode", ["deployment", "rayservice"])
def test_every_chart_engine_value_reaches_the_engine(mode: str) -> None:
    got = _rendered_settings(mode, NON_DEFAULT)
    for name in FIELDS:
        want = _get(NON_DEFAULT, chart_key(name))
        assert getattr(got, name) == want, name
