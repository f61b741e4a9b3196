"""The Helm chart, rendered by real Helm (helm-python-sdk) and validated offline.

Boundary: no cluster. Each value set a user would install with is rendered; every manifest is
validated strictly with kubernetes-validate against Kubernetes 1.30 and the newest bundled
version; custom resources the validator has no schema for (RayService, PodMonitor,
PrometheusRule) are checked for the structure their controllers need, and the pod templates
inside a RayService are validated as Pods. The CRDs in crds/ are the operator's; the chart's
RBAC and the example CRs are checked against whatever they say.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "lorafleet"
EXAMPLES = REPO / "examples"
RELEASE, NAMESPACE = "lf", "ai"
KUBE_VERSIONS = ("1.30.0", f"{kv.latest_version()}")

GPU_NODES = {
    "serving": {
        # GPUs are not set in resources: the chart derives them from what each replica asks Ray.
        "resources": {
            "requests": {"cpu": "8", "memory": "64Gi"},
            "limits": {"memory": "64Gi"},
        },
        "engine": {"gpusPerReplica": 1, "tensorParallelSize": 2},
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{
                        "key": "nvidia.com/gpu.product", "operator": "In",
                        "values": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
                    }]}]
                }
            }
        },
        "model": {"volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}},
    }
}

# Several serving pods share adapters through a store (the chart refuses them without one).
S3_STORE = {"url": "s3://lorafleet-adapters/prod", "endpointUrl": "http://minio.storage.svc:9000",
            "existingSecret": "adapter-store-creds"}
FILE_STORE = {"url": "file:///shared/adapters",
              "volume": {"persistentVolumeClaim": {"claimName": "adapter-store"}}}
ADAPTER_SECRETS = ["tenant-a-s3", "hf.token"]

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "kuberay": {
        "serving": {"mode": "rayservice", "autoscaling": {"enabled": True, "maxReplicas": 8},
                    "adapterStore": S3_STORE, "adapterSecrets": ADAPTER_SECRETS,
                    "adminPort": 8081, "apiDocs": True},
        "rayService": {"appArgs": {"max_loras": 8}},
    },
    "external-redis": {
        "redis": {"enabled": False,
                  "external": {"existingSecret": "lorafleet-registry", "existingSecretKey": "url"}},
        "auth": {"existingSecret": "lorafleet-admin", "existingSecretKey": "key"},
        "monitoring": {"metricsKey": {"existingSecret": "lorafleet-metrics"}},
    },
    "monitoring-off": {
        "monitoring": {"podMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
                       "grafanaDashboard": {"enabled": False}},
    },
    "gpu-nodes": {
        **GPU_NODES,
        "image": {"digest": "sha256:" + "a" * 64, "pullSecrets": ["ghcr"]},
    },
    "kuberay-gpu-nodes": {**copy.deepcopy(GPU_NODES), "rayService": {}, "operator": {"enabled": False}},
    "file-store": {"serving": {"replicas": 2, "adapterStore": FILE_STORE,
                               "adapterSecrets": ["tenant-a-s3"]}},
    "production": {
        "serving": {
            "replicas": 3,
            "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
            # The pods' cloud identity reads the bucket: no credentials Secret.
            "adapterStore": {"url": "s3://lorafleet-adapters/prod"},
            "adminPort": 8081,
            "ingress": {"enabled": True, "className": "nginx",
                        "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
                        "tls": [{"secretName": "lorafleet-tls", "hosts": ["lorafleet.example.com"]}]},
        },
        "redis": {"persistence": {"enabled": True, "storageClass": "fast"}},
        "commonLabels": {"team": "ml-platform"},
        "commonAnnotations": {"owner": "ml-platform"},
        "monitoring": {"podMonitor": {"labels": {"release": "kube-prometheus-stack"}}},
    },
}
VALUE_SETS["kuberay-gpu-nodes"]["serving"]["mode"] = "rayservice"
VALUE_SETS["kuberay-gpu-nodes"]["serving"]["adapterStore"] = FILE_STORE

# Custom resources kubernetes-validate has no schema for; minimal structure their controllers need.
_CONTAINERS = {"type": "array", "minItems": 1,
               "items": {"type": "object", "required": ["name", "image"]}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {
    "spec": {"type": "object", "required": ["containers"], "properties": {"containers": _CONTAINERS}}}}


def _cr_schema(spec_required: list[str], spec_properties: dict[str, Any]) -> dict[str, Any]:
    """A custom resource whose spec has `spec_required` and nothing outside `spec_properties`."""
    return {"type": "object", "required": ["spec"], "properties": {"spec": {
        "type": "object", "required": spec_required, "additionalProperties": False,
        "properties": spec_properties}}}


CUSTOM_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("ray.io/v1", "RayService"): _cr_schema(["serveConfigV2", "rayClusterConfig"], {
        "serveConfigV2": {"type": "string"},
        "rayClusterConfig": {
            "type": "object", "required": ["headGroupSpec", "workerGroupSpecs"],
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "headGroupSpec": {
                    "type": "object", "required": ["rayStartParams", "template"],
                    "properties": {"rayStartParams": {"type": "object",
                                                      "additionalProperties": {"type": "string"}},
                                   "template": _POD_TEMPLATE}},
                "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "required": ["groupName", "replicas", "minReplicas", "maxReplicas",
                                 "rayStartParams", "template"],
                    "properties": {
                        "groupName": {"type": "string"},
                        "replicas": {"type": "integer", "minimum": 0},
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 0},
                        "rayStartParams": {"type": "object",
                                           "additionalProperties": {"type": "string"}},
                        "template": _POD_TEMPLATE}}}}}}),
    ("monitoring.coreos.com/v1", "PodMonitor"): _cr_schema(["selector", "podMetricsEndpoints"], {
        "jobLabel": {"type": "string"},
        "selector": {"type": "object", "required": ["matchLabels"]},
        "namespaceSelector": {"type": "object"},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["port", "path"], "additionalProperties": False,
            "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                           "interval": {"type": "string"},
                           "scrapeTimeout": {"type": "string"},
                           "authorization": {
                               "type": "object", "required": ["type", "credentials"],
                               "additionalProperties": False,
                               "properties": {
                                   "type": {"enum": ["Bearer"]},
                                   "credentials": {
                                       "type": "object", "required": ["name", "key"],
                                       "additionalProperties": False,
                                       "properties": {"name": {"type": "string"},
                                                      "key": {"type": "string"}}}}}}}}}),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _cr_schema(["groups"], {
        "groups": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "rules"],
        "properties": {"name": {"type": "string"}, "interval": {"type": "string"},
                       "rules": {"type": "array", "minItems": 1, "items": {
                           "type": "object", "required": ["expr"],
                           "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                           "properties": {"expr": {"type": "string", "minLength": 1}}}}}}}}),
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Render the chart as `helm install` would (offline: `lookup` finds nothing)."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def render_notes(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def value_set(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = VALUE_SETS[request.param]
    return request.param, values, render(values)


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return [d["kind"] for d in docs]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    names = [d["metadata"]["name"] for d in found]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {names}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec a manifest carries, including RayService head and worker templates."""
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield name, d["spec"]["template"]
        elif d["kind"] == "RayService":
            cluster = d["spec"]["rayClusterConfig"]
            yield f"{name}/head", cluster["headGroupSpec"]["template"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{name}/{group['groupName']}", group["template"]


def serving_pods(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pod templates of the GPU serving pods (the Deployment, or the RayService workers)."""
    out = []
    for name, tpl in pod_specs(docs):
        if tpl["metadata"]["labels"].get("app.kubernetes.io/component") == "serving" \
                and not name.endswith("/head"):
            out.append(tpl)
    return out


# --- rendering and validation ----------------------------------------------------------------

@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_validates_strictly(value_set, version: str) -> None:
    name, _, docs = value_set
    assert docs, f"{name}: nothing rendered"
    for d in docs:
        key = (d["apiVersion"], d["kind"])
        if key in CUSTOM_SCHEMAS:
            jsonschema.validate(d, CUSTOM_SCHEMAS[key])
            continue
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']} invalid for {version}: {e}")
    # Pod templates inside custom resources are validated as the Pods they become.
    for pod_name, tpl in pod_specs(docs):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": tpl.get("metadata", {}),
               "spec": tpl["spec"]}
        try:
            kv.validate(pod, version, strict=True)
        except kv.ValidationError as e:  # pragma: no cover
            pytest.fail(f"{name}: pod template {pod_name} invalid for {version}: {e}")


def test_unknown_kinds_are_only_the_known_custom_resources(value_set) -> None:
    _, _, docs = value_set
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CUSTOM_SCHEMAS:
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(d, KUBE_VERSIONS[-1], strict=True)


def test_lint_is_clean(value_set) -> None:
    name, values, _ = value_set
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE,
                           kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, f"{name} on {version}: {report}"


def test_standard_labels_and_namespace(value_set) -> None:
    _, _, docs = value_set
    for d in docs:
        labels = d["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                    "app.kubernetes.io/component", "helm.sh/chart"):
            assert key in labels, f"{d['kind']}/{d['metadata']['name']} lacks label {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert d["metadata"]["namespace"] == NAMESPACE


def test_images_are_pinned(value_set) -> None:
    _, values, docs = value_set
    for pod_name, tpl in pod_specs(docs):
        for c in tpl["spec"]["containers"] + tpl["spec"].get("initContainers", []):
            image = c["image"]
            ref = image.split("@")[0]
            assert ":" in ref.rsplit("/", 1)[-1], f"{pod_name}: untagged image {image}"
            assert not ref.endswith(":latest"), f"{pod_name}: `latest` tag in {image}"
            if c["name"] != "redis" and values.get("image", {}).get("digest"):
                assert image.endswith("@" + values["image"]["digest"])


def test_credentials_come_only_from_secrets(value_set) -> None:
    _, _, docs = value_set
    for pod_name, tpl in pod_specs(docs):
        for c in tpl["spec"]["containers"]:
            for env in c.get("env", []):
                if re.search(r"KEY|PASSWORD|TOKEN", env["name"]):
                    assert "valueFrom" in env, f"{pod_name}: {env['name']} set in plain text"
                if "value" in env:
                    # A URL may carry a password only through $(VAR) expansion of a Secret.
                    assert not re.search(r"://[^/]*:[^$@/][^@/]*@", env["value"]), env
            for arg in c.get("args", []) + c.get("command", []):
                assert "lf_admin_" not in arg


def test_security_context_is_non_root(value_set) -> None:
    _, _, docs = value_set
    for pod_name, tpl in pod_specs(docs):
        assert tpl["spec"]["securityContext"]["runAsNonRoot"] is True, pod_name
        for c in tpl["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, pod_name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], pod_name


# --- what each value set turns on ------------------------------------------------------------

def test_defaults_install_the_whole_product() -> None:
    docs = render({})
    ks = kinds(docs)
    for kind in ("Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "Secret",
                 "StatefulSet", "PodDisruptionBudget", "PodMonitor", "PrometheusRule", "ConfigMap"):
        assert kind in ks, kind
    assert "RayService" not in ks and "HorizontalPodAutoscaler" not in ks and "Ingress" not in ks
    assert "ClusterRole" not in ks and "ClusterRoleBinding" not in ks

    serving = one(docs, "Deployment", "-serving")
    c = serving["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["serve", "--no-demo"]
    # The registry URL (with its password) reaches the server through the environment only.
    assert not any(a.startswith("--registry") for a in c["args"])
    assert "--port=8000" in c["args"] and {"name": "http", "containerPort": 8000,
                                            "protocol": "TCP"} in c["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in c["env"]}
    assert env["LORAFLEET_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{RELEASE}-lorafleet-admin", "key": "admin-key"}
    assert env["LORAFLEET_REGISTRY_URL"]["value"].startswith("redis://:$(REDIS_PASSWORD)@")

    admin = one(docs, "Secret", "-admin")
    key = base64.b64decode(admin["data"]["admin-key"]).decode()
    assert key.startswith("lf_admin_") and len(key) >= 40
    assert admin["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    svc = one(docs, "Service", f"{RELEASE}-lorafleet")
    assert svc["spec"]["selector"] == serving["spec"]["selector"]["matchLabels"]


def test_generated_admin_key_is_random_per_install() -> None:
    # Offline there is no cluster for `lookup`; on a cluster the existing Secret is reused.
    a = one(render({}), "Secret", "-admin")["data"]["admin-key"]
    b = one(render({}), "Secret", "-admin")["data"]["admin-key"]
    assert a != b
    template = (CHART / "templates" / "secrets.yaml").read_text()
    assert 'lookup "v1" "Secret"' in template


def test_external_redis_and_existing_secrets() -> None:
    docs = render(VALUE_SETS["external-redis"])
    assert "StatefulSet" not in kinds(docs) and "Secret" not in kinds(docs)
    for _, tpl in pod_specs(docs):
        env = {e["name"]: e for e in tpl["spec"]["containers"][0]["env"]}
        assert env["LORAFLEET_REGISTRY_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "lorafleet-registry", "key": "url"}
        admin = env.get("LORAFLEET_ADMIN_KEY") or env["LORAFLEET_OPERATOR_ADMIN_KEY"]
        assert admin["valueFrom"]["secretKeyRef"] == {"name": "lorafleet-admin", "key": "key"}
    assert "lorafleet-admin" in render_notes(VALUE_SETS["external-redis"])


def test_kuberay_mode_runs_the_serve_app_with_autoscaling() -> None:
    docs = render(VALUE_SETS["kuberay"])
    assert "Deployment" in kinds(docs)  # the operator
    assert not [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-serving")]
    assert "HorizontalPodAutoscaler" not in kinds(docs)
    rs = one(docs, "RayService")
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "lorafleet.serving.deploy:build_app"
    assert app["args"]["model_dir"] == "/models/SmolLM2-135M-Instruct"
    # rayService.appArgs wins over the derived value; an engine setting lands in `engine`.
    assert app["args"]["engine"]["max_loras"] == 8 and "max_loras" not in app["args"]
    assert app["args"]["engine_autoscaling_config"]["max_replicas"] == 8
    assert serve["http_options"]["port"] == 8000
    assert not re.search(r"redis://|lf_admin_", rs["spec"]["serveConfigV2"])
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    (worker,) = cluster["workerGroupSpecs"]
    assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 8)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(head["resources"])
    # The PDB protects only GPU workers; the Service and PodMonitor reach Ray pods.
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "worker"
    pm = one(docs, "PodMonitor", "-serving")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["http", "metrics"]


def test_scheduling_reaches_the_engine_in_both_modes() -> None:
    tokenflow = {"serving": {"engine": {"scheduling": {
        "policy": "tokenflow", "kvOffloadGib": 4, "params": {"resume_margin_s": 2}}}}}
    serving = one(render(tokenflow), "Deployment", "-serving")
    args = serving["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--scheduling-policy=tokenflow", "--kv-offload-gib=4", "--default-consumption-rate=6",
            "--scheduling-param=resume_margin_s=2"} <= set(args)
    rs = one(render(_deep_merge(VALUE_SETS["kuberay"], tokenflow)), "RayService")
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["engine"]["scheduling_policy"] == "tokenflow"
    assert app["args"]["engine"]["kv_offload_gib"] == 4
    assert app["args"]["engine"]["scheduling_params"] == {"resume_margin_s": 2}
    from lorafleet.serving.deploy import AppArgs

    AppArgs(**app["args"])  # the Serve app builder accepts what the chart renders


def test_schema_names_every_scheduling_knob() -> None:
    import dataclasses

    from lorafleet.serving.scheduling import TokenFlowParams

    schema = json.loads((CHART / "values.schema.json").read_text())
    sched = schema["properties"]["serving"]["properties"]["engine"]["properties"]["scheduling"]
    names = sched["properties"]["params"]["propertyNames"]["enum"]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TokenFlowParams))


def test_monitoring_off_renders_no_monitoring_objects() -> None:
    ks = kinds(render(VALUE_SETS["monitoring-off"]))
    assert not {"PodMonitor", "PrometheusRule", "ConfigMap"} & set(ks)


@pytest.mark.parametrize("name", ["gpu-nodes", "kuberay-gpu-nodes"])
def test_gpu_node_placement_reaches_serving_pods(name: str) -> None:
    docs = render(VALUE_SETS[name])
    pods = serving_pods(docs)
    assert pods
    for tpl in pods:
        spec = tpl["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert "nodeAffinity" in spec["affinity"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2  # TP 2 x 1
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "models"
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # Nothing else lands on GPU nodes.
    for pod_name, tpl in pod_specs(docs):
        if tpl not in pods:
            assert "nodeSelector" not in tpl["spec"], pod_name
            assert "nvidia.com/gpu" not in json.dumps(tpl["spec"]["containers"]), pod_name


def test_production_values_add_hpa_ingress_and_persistence() -> None:
    docs = render(VALUE_SETS["production"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in one(docs, "Deployment", "-serving")["spec"]  # the HPA owns it
    ing = one(docs, "Ingress")
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == f"{RELEASE}-lorafleet"
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"
    assert all(d["metadata"]["labels"]["team"] == "ml-platform" for d in docs)
    assert one(docs, "PodMonitor", "-serving")["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --- operator RBAC and the CRDs --------------------------------------------------------------

def crd_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((CHART / "crds").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return [d for d in docs if d.get("kind") == "CustomResourceDefinition"]


def test_crds_validate() -> None:
    crds = crd_documents()
    if not crds:
        pytest.skip("charts/lorafleet/crds/ holds no CRD yet (the operator's part)")
    for crd in crds:
        for version in KUBE_VERSIONS:
            kv.validate(crd, version, strict=True)
    with helm.Chart.load(CHART) as chart:
        shipped = {c["filename"].rsplit("/", 1)[-1] for c in chart.crds}
    assert shipped >= {p.name for p in (CHART / "crds").glob("*.yaml")}


def test_operator_rbac_is_least_privilege_and_matches_the_crds() -> None:
    docs = render({})
    rules = one(docs, "Role")["rules"]
    assert "ClusterRole" not in kinds(docs)
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                granted.setdefault((g, r), set()).update(rule["verbs"])
    expected = {("", "secrets"): {"get", "list", "watch"},
                ("", "events"): {"create", "patch"},
                ("events.k8s.io", "events"): {"create", "patch"}}
    crds = crd_documents()
    if not crds:
        pytest.skip("no CRDs in crds/ yet")
    for crd in crds:
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        # No create/delete: the operator reconciles objects users own.
        expected[(group, plural)] = {"get", "list", "watch", "patch"}
        expected[(group, f"{plural}/status")] = {"get", "patch", "update"}
    assert granted == expected
    binding = one(docs, "RoleBinding")
    assert binding["subjects"][0]["name"] == one(docs, "ServiceAccount", "-operator")["metadata"]["name"]
    op = one(docs, "Deployment", "-operator")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in op["containers"][0]["env"]}
    assert json.loads(env["LORAFLEET_OPERATOR_NAMESPACES"]["value"]) == [NAMESPACE]
    assert env["LORAFLEET_OPERATOR_SERVING_URL"]["value"] == f"http://{RELEASE}-lorafleet.{NAMESPACE}.svc:8000"
    # Serving pods get no API token at all.
    for tpl in serving_pods(docs):
        assert tpl["spec"]["automountServiceAccountToken"] is False


def _example_crs() -> list[tuple[str, dict[str, Any]]]:
    if not EXAMPLES.is_dir():
        return []
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d and d.get("apiVersion", "").startswith("lorafleet.io/"):
                out.append((path.name, d))
    return out


def test_example_crs_match_the_crds() -> None:
    crds = {c["spec"]["names"]["kind"]: c for c in crd_documents()}
    examples = _example_crs()
    if not crds or not examples:
        pytest.skip("needs CRDs in charts/lorafleet/crds/ and CRs in examples/")
    for name, cr in examples:
        crd = crds[cr["kind"]]
        group, version = cr["apiVersion"].split("/")
        assert group == crd["spec"]["group"], name
        (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schema = copy.deepcopy(ver["schema"]["openAPIV3Schema"])
        # metadata is the API server's business; the rest is what the CRD says.
        schema.setdefault("properties", {}).pop("metadata", None)
        jsonschema.validate(cr, schema)


# --- values: schema and documentation --------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"serving": {"replicas": "two"}},
    {"serving": {"mode": "kubernetes"}},
    {"serving": {"port": 70000}},
    {"image": {"tag": "latest"}},
    {"image": {"tag": 1.0}},
    {"image": {"digest": "md5:abc"}},
    {"redis": {"enabled": False}},  # an external Redis needs the Secret with its URL
    {"monitoring": {"podMonitor": {"interval": "often"}}},
    {"operator": {"replicas": 2}},
    {"rayService": {"importPath": "not a path"}},
    {"unknownKey": True},
    {"serving": {"resources": {"limit": {"cpu": 1}}}},
    {"serving": {"engine": {"scheduling": {"policy": "lifo"}}}},
    {"serving": {"engine": {"scheduling": {"params": {"resume_margn_s": 2}}}}},
    {"serving": {"engine": {"scheduling": {"kvOffloadGib": -1}}}},
    {"serving": {"engine": {"gpusPerReplica": -1}}},
    {"serving": {"engine": {"tensorParallelSize": 0}}},
    {"serving": {"engine": {"tensorParallelSize": 2, "gpusPerReplica": 0.5}}},
    {"serving": {"engine": {"kvCacheGib": 0}}},  # the engine needs a size: 0 is not "auto"
    {"serving": {"engine": {"placementStrategy": "RANDOM"}}},
    {"serving": {"engine": {"scheduling": {"maxRunning": 0}}}},
    {"serving": {"engine": {"maxModelLen": 32}}},
    # One knob for GPUs: the chart derives the pods' GPUs from gpusPerReplica.
    {"serving": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
    {"rayService": {"ingressReplicas": 0}},
    {"redis": {"persistence": {"appendfsync": "no"}}},
    {"serving": {"adapterStore": {"url": "gs://bucket/prefix"}}},
    {"serving": {"adapterStore": {"url": "file:///shared/adapters"}}},  # no volume to put it on
    {"serving": {"adapterStore": {"endpointUrl": "minio:9000"}}},
    {"serving": {"adapterStore": {"accessKey": "AKIA..."}}},
    {"serving": {"adapterSecrets": ["Tenant_A"]}},
    {"serving": {"adapterSecrets": ["a", "a"]}},
])
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)
        with pytest.raises(helm.HelmError):
            chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_every_value_set() -> None:
    with helm.Chart.load(CHART) as chart:
        for values in VALUE_SETS.values():
            chart.validate_schema(values)
        assert chart.schema is not None


def _leaf_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaf_paths(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


def test_every_value_is_documented() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    documented = set(re.findall(r"^\s*## @param (\S+) \S", text, flags=re.M))
    all_paths: set[str] = set()
    for path in _leaf_paths(values):
        parts = path.split(".")
        all_paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        # A leaf is documented itself, or sits inside a documented raw block (resources, ...).
        assert any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)), \
            f"values.yaml: `{path}` has no `## @param` line"
    stale = documented - all_paths
    assert not stale, f"documented keys that do not exist: {sorted(stale)}"
    # A documented raw block is a leaf-ish Kubernetes structure, not a section of the chart.
    sections = {p for p in documented if isinstance(_get(values, p), dict)}
    for p in sections:
        assert not any(d.startswith(p + ".") for d in documented), \
            f"`{p}` is documented as a whole and key by key"


def _get(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def test_values_yaml_image_tags_are_pinned() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for image in (values["image"], values["redis"]["image"]):
        assert image["tag"] and image["tag"] != "latest"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert values["image"]["tag"] == chart["appVersion"]


def test_monitoring_objects_carry_the_files_verbatim() -> None:
    docs = render({})
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert one(docs, "PrometheusRule")["spec"] == rules
    cm = one(docs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["lorafleet.json"]) == json.loads(
        (CHART / "files" / "grafana-dashboard.json").read_text())


def test_notes_tell_how_to_reach_the_api_and_get_a_key() -> None:
    notes = render_notes({})
    assert f"port-forward svc/{RELEASE}-lorafleet 8000:8000" in notes
    assert f"get secret {RELEASE}-lorafleet-admin" in notes
    assert "/admin/v1/tenants/alice/keys" in notes
    notes = render_notes(VALUE_SETS["production"])
    assert "https://lorafleet.example.com/v1" in notes


# --- devices, placement and durable state ------------------------------------------------------

def _gpu_limit(tpl: dict[str, Any]) -> int:
    res = tpl["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    return int(res["limits"]["nvidia.com/gpu"])


def _engine_options_of(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The Ray Serve options of one engine replica, and replicas per pod, as the code builds
    them from what the chart rendered (container args, or the Serve app's args)."""
    from lorafleet.serving.cli import build_parser
    from lorafleet.serving.config import EngineConfig
    from lorafleet.serving.deploy import AppArgs, engine_options

    if "RayService" in kinds(docs):
        (app,) = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"]
        return engine_options(AppArgs(**app["args"]).engine_config(), 1), 1
    c = one(docs, "Deployment", "-serving")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(c["args"])
    config = EngineConfig(model_dir=args.model_dir, served_model_name=args.served_model_name,
                          num_gpus=args.num_gpus, tensor_parallel_size=args.tensor_parallel_size)
    return engine_options(config, args.replicas), args.replicas


@pytest.mark.parametrize("name", ["gpu-nodes", "kuberay-gpu-nodes"])
def test_pod_gpus_and_ray_actor_options_agree(name: str) -> None:
    docs = render(VALUE_SETS[name])
    options, per_pod = _engine_options_of(docs)
    # TP 2: one bundle of one GPU per rank, packed on the pod's node; the actor itself holds none.
    assert options["placement_group_bundles"] == [{"GPU": 1.0}, {"GPU": 1.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["num_gpus"] == 0
    replica_gpus = sum(b.get("GPU", 0) for b in options["placement_group_bundles"])
    for tpl in serving_pods(docs):
        assert _gpu_limit(tpl) == replica_gpus * per_pod
        spec = tpl["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
            in spec["tolerations"]
    if name == "kuberay-gpu-nodes":
        (worker,) = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert worker["rayStartParams"]["num-gpus"] == "2"


@pytest.mark.parametrize("mode", ["deployment", "rayservice"])
@pytest.mark.parametrize(("engine", "actor_gpus", "pod_gpus"), [
    ({}, 1.0, {"deployment": 1, "rayservice": 1}),    # defaults: the CUDA image, one GPU each
    ({"gpusPerReplica": 0}, 0.0, {"deployment": 0, "rayservice": 0}),  # the CPU image
    # Three replicas sharing GPUs in one pod need 1.5, so 2; a RayService worker holds one.
    ({"gpusPerReplica": 0.5, "replicasPerPod": 3}, 0.5, {"deployment": 2, "rayservice": 1}),
])
def test_tp1_replicas_hold_their_gpus_in_both_modes(
    mode: str, engine: dict[str, Any], actor_gpus: float, pod_gpus: dict[str, int]
) -> None:
    docs = render({"serving": {"mode": mode, "engine": engine, "adapterStore": S3_STORE}})
    options, per_pod = _engine_options_of(docs)
    assert options["ray_actor_options"]["num_gpus"] == actor_gpus
    assert "placement_group_bundles" not in options
    for tpl in serving_pods(docs):
        limits = tpl["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu", 0) == pod_gpus[mode]
        assert per_pod * actor_gpus <= pod_gpus[mode]  # Ray can place every replica of the pod


def test_rayservice_every_ray_pod_has_the_model_and_the_ingress_count_is_a_value() -> None:
    docs = render(_deep_merge(VALUE_SETS["kuberay-gpu-nodes"], {"rayService": {"ingressReplicas": 3}}))
    rs = one(docs, "RayService")
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["ingress_num_replicas"] == 3
    from lorafleet.serving.deploy import AppArgs

    assert AppArgs(**app["args"]).ingress_num_replicas == 3
    # The Ingress reads the tokenizer from model_dir and Ray may place it on any node.
    cluster = rs["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for tpl in templates:
        c = tpl["spec"]["containers"][0]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert app["args"]["model_dir"].startswith(mounts["model"]["mountPath"])
        assert mounts["model"]["readOnly"] is True
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "models"
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]
    # The head still asks for no GPU and does not land on GPU nodes.
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "nodeSelector" not in head and "nvidia.com/gpu" not in json.dumps(head["containers"])


def test_redis_is_durable_by_default() -> None:
    docs = render({})
    sts = one(docs, "StatefulSet", "-redis")
    spec = sts["spec"]["template"]["spec"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default
    assert "data" not in {v["name"] for v in spec.get("volumes", [])}  # no emptyDir shadowing it
    assert {"name": "data", "mountPath": "/data"} in spec["containers"][0]["volumeMounts"]
    cmd = spec["containers"][0]["args"][0]
    assert "--appendonly yes" in cmd and "--appendfsync everysec" in cmd and "--dir /data" in cmd

    docs = render({"redis": {"persistence": {"storageClass": "fast", "size": "10Gi",
                                             "appendfsync": "always"}}})
    sts = one(docs, "StatefulSet", "-redis")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert (claim["spec"]["storageClassName"], claim["spec"]["resources"]["requests"]["storage"]) \
        == ("fast", "10Gi")
    assert "--appendfsync always" in sts["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_redis_without_a_volume_still_keeps_an_append_only_file() -> None:
    # An emptyDir survives container restarts: AOF then replays every acknowledged write
    # (a revoked key stays revoked) even in a throwaway install.
    sts = one(render({"redis": {"persistence": {"enabled": False}}}), "StatefulSet", "-redis")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert "--appendonly yes" in sts["spec"]["template"]["spec"]["containers"][0]["args"][0]


# --- adapters as content: the shared store, secretRefs, the proxy's arrival stamp --------------

ARRIVAL_CALLBACK = "lorafleet.serving.api.arrival:proxy_middlewares"
DEPLOYMENT_WITH_STORE = {"serving": {"replicas": 2, "adapterStore": S3_STORE,
                                     "adapterSecrets": ADAPTER_SECRETS}}


def serving_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(pod name, pod spec, its serving container) for the Deployment or every Ray pod."""
    out = []
    for name, tpl in pod_specs(docs):
        if tpl["metadata"]["labels"].get("app.kubernetes.io/component") == "serving":
            out.append((name, tpl["spec"], tpl["spec"]["containers"][0]))
    return out


def _data_dir(docs: list[dict[str, Any]]) -> str:
    """The data directory the server is started with (flag, or the Serve app's args)."""
    if "RayService" in kinds(docs):
        (app,) = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"]
        return str(app["args"]["data_dir"])
    args = one(docs, "Deployment", "-serving")["spec"]["template"]["spec"]["containers"][0]["args"]
    return next(a.split("=", 1)[1] for a in args if a.startswith("--data-dir="))


@pytest.mark.parametrize("values", [DEPLOYMENT_WITH_STORE, VALUE_SETS["kuberay"]],
                         ids=["deployment", "rayservice"])
def test_every_serving_container_gets_the_store_and_the_adapter_secrets(
    values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorafleet.serving.config import ServeSettings

    docs = render(values)
    containers = serving_containers(docs)
    assert len(containers) == (2 if "RayService" in kinds(docs) else 1)  # head + workers
    for pod_name, spec, c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["LORAFLEET_ADAPTER_STORE"]["value"] == "s3://lorafleet-adapters/prod", pod_name
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000", pod_name
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "adapter-store-creds",
                                                             "key": key}, pod_name
        # What the server makes of this environment and its data directory.
        for name, e in env.items():
            if name.startswith("LORAFLEET_ADAPTER_") and "value" in e:
                monkeypatch.setenv(name, e["value"])
        files = ServeSettings(data_dir=_data_dir(docs)).adapter_files()
        assert files.store == "s3://lorafleet-adapters/prod"
        # Each Secret an adapter may name is a read-only directory <secrets dir>/<name>.
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for secret in ADAPTER_SECRETS:
            mount = mounts[f"{files.secrets_dir}/{secret}"]
            assert mount["readOnly"] is True and "subPath" not in mount, pod_name
            # optional: a tenant's deleted Secret must not keep every serving pod from starting.
            assert volumes[mount["name"]]["secret"] == {"secretName": secret, "optional": True}
        assert files.secrets_dir.startswith(mounts[_data_dir(docs)]["mountPath"])


def test_store_credentials_are_optional_and_stay_out_of_the_operator() -> None:
    # production: the pods' cloud identity reads the bucket; no endpoint, no credentials.
    docs = render(VALUE_SETS["production"])
    for pod_name, _, c in serving_containers(docs):
        names = {e["name"] for e in c["env"]}
        assert "LORAFLEET_ADAPTER_STORE" in names, pod_name
        assert not {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & names
    # The operator hands an adapter's secretRef to serving and fetches nothing itself: it gets
    # neither the store's credentials nor the tenants' Secrets.
    for values in (DEPLOYMENT_WITH_STORE, VALUE_SETS["kuberay"]):
        op = one(render(values), "Deployment", "-operator")["spec"]["template"]["spec"]
        env = {e["name"] for e in op["containers"][0]["env"]}
        assert not [n for n in env if n.startswith(("AWS_", "LORAFLEET_ADAPTER_"))], env
        assert [v["name"] for v in op["volumes"]] == ["tmp"]


def test_a_file_store_is_mounted_writable_in_every_serving_pod() -> None:
    for values in (VALUE_SETS["file-store"], VALUE_SETS["kuberay-gpu-nodes"]):
        docs = render(values)
        for pod_name, spec, c in serving_containers(docs):
            env = {e["name"]: e for e in c["env"]}
            assert env["LORAFLEET_ADAPTER_STORE"]["value"] == "file:///shared/adapters"
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/shared/adapters"]
            assert not mount.get("readOnly"), pod_name  # imports write their copies there
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            assert volume["persistentVolumeClaim"]["claimName"] == "adapter-store", pod_name


@pytest.mark.parametrize("values", [{}, VALUE_SETS["kuberay"]], ids=["deployment", "rayservice"])
def test_every_ray_node_stamps_arrivals_in_its_proxy(values: dict[str, Any]) -> None:
    docs = render(values)
    containers = serving_containers(docs)
    assert containers
    for pod_name, _, c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == {
            "name": "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "value": ARRIVAL_CALLBACK}, pod_name
    try:
        from lorafleet.serving.api import arrival
    except ImportError:  # the module lands with the arrival stamp; the chart names it already
        return
    assert arrival.CALLBACK_PATH == ARRIVAL_CALLBACK
    assert arrival.CALLBACK_ENV == "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


@pytest.mark.parametrize("values", [{}, VALUE_SETS["kuberay"]], ids=["deployment", "rayservice"])
@pytest.mark.parametrize("grpc", [True, False])
def test_every_ray_node_gets_the_streaming_transport_lorafleet_serve_sets(
    values: dict[str, Any], grpc: bool,
) -> None:
    from lorafleet.serving.deploy import STREAMING_ENVIRONMENT

    containers = serving_containers(render(_deep_merge(values, {"serving": {"rayServeGrpc": grpc}})))
    assert containers
    for pod_name, _, c in containers:
        env = {e["name"]: e.get("value") for e in c["env"]}
        for name, on in STREAMING_ENVIRONMENT.items():
            # Every one of them is a switch ("1"/"0") whose Ray default is the opposite.
            assert env[name] == (on if grpc else str(1 - int(on))), (pod_name, name)


@pytest.mark.parametrize(("values", "said"), [
    ({"serving": {"replicas": 2}}, "up to 2 serving pods"),
    ({"serving": {"autoscaling": {"enabled": True, "maxReplicas": 4}}}, "up to 4 serving pods"),
    ({"serving": {"mode": "rayservice"}}, "a RayService"),
])
def test_several_serving_pods_without_a_store_do_not_render(values: dict[str, Any], said: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError) as failure:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    message = str(failure.value)
    assert said in message and "serving.adapterStore.url" in message
    assert "serving.adapterStore.allowWithoutStore" in message


def test_one_pod_needs_no_store_and_the_opt_out_is_loud() -> None:
    docs = render({})  # one pod: its own data directory holds every adapter it imported
    for _, _, c in serving_containers(docs):
        assert "LORAFLEET_ADAPTER_STORE" not in {e["name"] for e in c["env"]}
    assert "WARNING" not in render_notes({})
    for values in ({"serving": {"replicas": 3, "adapterStore": {"allowWithoutStore": True}}},
                   {"serving": {"mode": "rayservice", "adapterStore": {"allowWithoutStore": True}}}):
        docs = render(values)
        for _, _, c in serving_containers(docs):
            assert "LORAFLEET_ADAPTER_STORE" not in {e["name"] for e in c["env"]}
        notes = render_notes(values)
        assert "WARNING" in notes and "s3:// or http(s)://" in notes
    assert "shared store s3://lorafleet-adapters/prod" in render_notes(DEPLOYMENT_WITH_STORE)

