"""Chart values that harden a deployment (issue 19), rendered by real Helm (no cluster).

- Adapter intake bounds: every `IntakeSettings` field is a chart value with the model's
  default, and what the chart renders is what `IntakeSettings` reads in each serving container.
- Ray token auth in rayservice mode, from a generated (or given) Secret.
- NetworkPolicies: the API port open; Ray's ports, the admin port and Redis only from the
  release's own pods (and the dashboard from the KubeRay operator).
- Prometheus scrapes /metrics with a metrics key of its own, never the admin key.
"""

from __future__ import annotations

import base64
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


# --- Ray token auth (rayservice mode) ------------------------------------------------------


def one(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def secret_value(docs: list[dict[str, Any]], name: str, key: str) -> str:
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name)
    return base64.b64decode(secret["data"][key]).decode()


def test_rayservice_turns_ray_token_auth_on_from_a_generated_secret() -> None:
    docs = render(MODES["rayservice"])
    auth = one(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": f"{RELEASE}-lorafleet-ray-auth"}
    token = secret_value(docs, auth["secretName"], "auth_token")  # the key KubeRay reads
    assert len(token) >= 32 and token.isalnum()
    assert token != secret_value(render(MODES["rayservice"]), auth["secretName"], "auth_token")
    assert 'lookup "v1" "Secret"' in (CHART / "templates" / "secrets.yaml").read_text()
    assert one(docs, "Secret", "-ray-auth")["metadata"]["annotations"][
        "helm.sh/resource-policy"] == "keep"


def test_ray_auth_takes_an_existing_secret_and_is_absent_in_deployment_mode() -> None:
    docs = render(merged(MODES["rayservice"], {"rayService": {"auth": {
        "existingSecret": "ray-token"}}}))
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["secretName"] == "ray-token"
    assert not [d for d in docs if d["metadata"]["name"].endswith("-ray-auth")]
    assert not [d for d in render({}) if d["metadata"]["name"].endswith("-ray-auth")]


# --- NetworkPolicies -------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Labels of every pod the release runs, by a short name."""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            out[d["metadata"]["name"]] = d["spec"]["template"]["metadata"]["labels"]
        elif d["kind"] == "RayService":
            cluster = d["spec"]["rayClusterConfig"]
            out["ray-head"] = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
            for group in cluster["workerGroupSpecs"]:
                out[f"ray-{group['groupName']}"] = group["template"]["metadata"]["labels"]
    return out


def admitted(policy: dict[str, Any], port: int, peer: dict[str, str] | None) -> bool:
    """Whether `policy` lets a pod with labels `peer` (None: any other pod, or outside the
    cluster) reach `port`."""
    for rule in policy["spec"]["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        sources = rule.get("from")
        if sources is None:
            return True
        if peer is not None and any("podSelector" in s and "namespaceSelector" not in s
                                    and selects(s["podSelector"], peer) for s in sources):
            return True
    return False


@pytest.mark.parametrize("mode", sorted(MODES))
def test_only_the_api_port_is_open_to_everyone(mode: str) -> None:
    docs = render(MODES[mode])
    pods = pod_labels(docs)
    serving = one(docs, "NetworkPolicy", "-serving")
    redis = one(docs, "NetworkPolicy", "-redis")
    serving_pods = {n: labels for n, labels in pods.items() if selects(
        serving["spec"]["podSelector"], labels)}
    assert set(serving_pods) == ({"ray-head", "ray-gpu"} if mode == "rayservice"
                                 else {f"{RELEASE}-lorafleet-serving"})
    assert selects(redis["spec"]["podSelector"], pods[f"{RELEASE}-lorafleet-redis"])
    assert not selects(redis["spec"]["podSelector"], pods[f"{RELEASE}-lorafleet-operator"])
    operator = pods[f"{RELEASE}-lorafleet-operator"]
    assert admitted(serving, 8000, None)  # the OpenAI API
    for port in (6379, 8265, 10001, 52365, 9999):  # GCS, dashboard, client, agent, a raylet
        assert not admitted(serving, port, None), port
        assert admitted(serving, port, operator) and all(
            admitted(serving, port, labels) for labels in serving_pods.values())
    assert not admitted(redis, 6379, None)
    assert all(admitted(redis, 6379, labels) for labels in (operator, *serving_pods.values()))
    if mode == "rayservice":
        dashboard = [r for r in serving["spec"]["ingress"]
                     if [p["port"] for p in r.get("ports", [])] == [8265]]
        assert dashboard and dashboard[0]["from"] == [{"namespaceSelector": {}, "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]


def test_network_policies_can_be_narrowed_or_turned_off() -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]
    serving = one(render({"networkPolicy": {"apiFrom": peers}}), "NetworkPolicy", "-serving")
    assert not admitted(serving, 8000, None)
    assert [r["from"] for r in serving["spec"]["ingress"] if r.get("ports")] == [peers]
    assert "NetworkPolicy" not in [d["kind"] for d in render(
        {"networkPolicy": {"enabled": False}})]
    assert schema_errors({"networkPolicy": {"apiFrom": [{"bogus": {}}]}})


# --- a metrics key of its own ----------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_prometheus_scrapes_with_the_metrics_key_not_the_admin_key(mode: str) -> None:
    docs = render(MODES[mode])
    endpoint = one(docs, "PodMonitor", "-serving")["spec"]["podMetricsEndpoints"][0]
    ref = endpoint["authorization"]["credentials"]
    assert ref == {"name": f"{RELEASE}-lorafleet-metrics", "key": "metrics-key"}
    metrics_key = secret_value(docs, ref["name"], ref["key"])
    assert len(metrics_key) >= 32
    assert metrics_key != secret_value(docs, f"{RELEASE}-lorafleet-admin", "admin-key")
    for container in serving_containers(docs):
        env = {e["name"]: e for e in container["env"]}
        assert env["LORAFLEET_METRICS_KEY"]["valueFrom"]["secretKeyRef"] == ref


def test_an_existing_metrics_secret_is_used_as_is() -> None:
    docs = render({"monitoring": {"metricsKey": {"existingSecret": "prom-scrape",
                                                 "existingSecretKey": "token"}}})
    ref = one(docs, "PodMonitor", "-serving")["spec"]["podMetricsEndpoints"][0][
        "authorization"]["credentials"]
    assert ref == {"name": "prom-scrape", "key": "token"}
    assert not [d for d in docs if d["metadata"]["name"].endswith("-metrics")]


# --- the API surface: docs opt-in, a separate admin listener ---------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_an_admin_port_keeps_the_admin_api_inside_the_release(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafleet.serving.config import ServeSettings

    docs = render(merged(MODES[mode], {"serving": {"adminPort": 8081}}))
    for container in serving_containers(docs):
        assert {"name": "admin", "containerPort": 8081} in [
            {k: p[k] for k in ("name", "containerPort")} for p in container["ports"]]
        for e in container["env"]:
            if e["name"] in ("LORAFLEET_ADMIN_PORT", "LORAFLEET_HOST", "LORAFLEET_API_DOCS"):
                monkeypatch.setenv(e["name"], e["value"])
        settings = ServeSettings()
        assert (settings.admin_port, settings.host, settings.api_docs) == (8081, "0.0.0.0", False)
    service = one(docs, "Service", f"{RELEASE}-lorafleet")
    assert {"name": "admin", "port": 8081, "targetPort": "admin", "protocol": "TCP"} in \
        service["spec"]["ports"]
    operator = one(docs, "Deployment", "-operator")["spec"]["template"]
    env = {e["name"]: e.get("value") for e in operator["spec"]["containers"][0]["env"]}
    assert env["LORAFLEET_OPERATOR_SERVING_URL"] == f"http://{RELEASE}-lorafleet.{NAMESPACE}.svc:8081"
    policy = one(docs, "NetworkPolicy", "-serving")
    assert not admitted(policy, 8081, None)
    assert admitted(policy, 8081, operator["metadata"]["labels"])


def test_docs_are_off_by_default_and_a_value_turns_them_on() -> None:
    def docs_env(values: dict[str, Any]) -> set[str | None]:
        return {e.get("value") for c in serving_containers(render(values)) for e in c["env"]
                if e["name"] == "LORAFLEET_API_DOCS"}

    assert docs_env({}) == set()
    assert docs_env({"serving": {"apiDocs": True}}) == {"true"}
    assert schema_errors({"serving": {"adminPort": 0}})


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_request_policy_reaches_every_serving_container(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafleet.serving.config import ServeSettings

    names = ("LORAFLEET_IGNORE_EOS_TENANTS", "LORAFLEET_TOOL_CALL_PARSER")

    def policies(values: dict[str, Any]) -> list[Any]:
        out = []
        for container in serving_containers(render(merged(MODES[mode], values))):
            for name in names:
                monkeypatch.delenv(name, raising=False)
            for e in container["env"]:
                if e["name"] in names:
                    monkeypatch.setenv(e["name"], e["value"])
            out.append(ServeSettings().request_policy())
        assert out
        return out

    assert {(p.ignore_eos_tenants, p.tool_call_parser) for p in policies({})} == {
        (frozenset(), None)}  # nobody may send ignore_eos unless the values name them
    named = {"serving": {"requestPolicy": {"ignoreEosTenants": ["bench", "loadtest"],
                                           "toolCallParser": "hermes"}}}
    assert {(p.ignore_eos_tenants, p.tool_call_parser) for p in policies(named)} == {
        (frozenset({"bench", "loadtest"}), "hermes")}
    every = {"serving": {"requestPolicy": {"ignoreEosTenants": ["*"]}}}
    assert {p.ignore_eos_tenants for p in policies(every)} == {"*"}
    assert schema_errors({"serving": {"requestPolicy": {"ignoreEosTenants": ["a,b"]}}})
    assert not schema_errors({"serving": {"requestPolicy": {"ignoreEosTenants": []}}})


# --- the operator's tenant bindings ----------------------------------------------------------


def _operator_config(values: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    from lorafleet.operator.settings import OperatorConfig

    container = one(render(values), "Deployment", "-operator")["spec"]["template"]["spec"][
        "containers"][0]
    for e in container["env"]:
        if e["name"].startswith("LORAFLEET_OPERATOR_") and "value" in e \
                and "$(" not in e["value"]:
            monkeypatch.setenv(e["name"], e["value"])
    return OperatorConfig()


def test_the_operator_binds_tenants_to_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    # Default: the one watched namespace (the release's) acts for any tenant.
    assert _operator_config({}, monkeypatch).tenant_namespaces == {NAMESPACE: ("*",)}
    given = {"team-a": ["acme", "acme-dev"], "platform": ["*"]}
    config = _operator_config({"operator": {"tenantNamespaces": given}}, monkeypatch)
    assert config.tenant_namespaces == {k: tuple(v) for k, v in given.items()}
    assert schema_errors({"operator": {"tenantNamespaces": {"team-a": ["Not A Name"]}}})
