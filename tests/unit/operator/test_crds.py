"""The CRDs in charts/lorafleet/crds accept the example CRs and reject malformed ones.

CRs are validated with jsonschema against each CRD's openAPIV3Schema (a real API server does
this; the emulator does not). The CRDs themselves are validated with `kubernetes-validate
--strict` against the bundled Kubernetes 1.37 schemas, offline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CRD_DIR = REPO / "charts" / "lorafleet" / "crds"
EXAMPLES = REPO / "examples"


def crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (version,) = crd["spec"]["versions"]
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate(doc: dict[str, Any]) -> None:
    schema = crd_schemas()[doc["kind"]]
    jsonschema.Draft7Validator(schema).validate(doc)
    # jsonschema does not know the CEL rules (x-kubernetes-validations): check ours by hand.
    placement = (doc.get("spec") or {}).get("placement") or {}
    if placement.get("mode") == "replicas" and "replicas" not in placement:
        raise jsonschema.ValidationError("placement.replicas is required when mode is replicas")


def test_both_crds_are_present_with_short_names_and_status() -> None:
    kinds = {}
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        kinds[crd["spec"]["names"]["kind"]] = crd
    assert set(kinds) == {"LoRAAdapter", "Tenant"}
    lora = kinds["LoRAAdapter"]["spec"]
    assert {"lora", "loras"} <= set(lora["names"]["shortNames"])
    (version,) = lora["versions"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Tenant", "Base Model", "Phase", "Ready", "Wanted", "Age"]
    phases = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]
    assert phases["enum"] == ["Pending", "Fetching", "Validating", "Loading", "Ready", "Failed",
                              "Deleting"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_accepted(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        validate(doc)


@pytest.mark.parametrize("path", sorted((EXAMPLES / "invalid").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_malformed_examples_are_rejected(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_replicas_mode_without_count_is_rejected() -> None:
    doc = yaml.safe_load((EXAMPLES / "loraadapter-replicas.yaml").read_text())
    del doc["spec"]["placement"]["replicas"]
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_status_schema_describes_what_the_operator_writes() -> None:
    """A status patch the operator builds validates against the CRD (a strict schema prunes)."""
    from datetime import UTC, datetime

    from lorafleet.operator.decisions import (
        AdapterStatus,
        Observed,
        ServingAdapter,
        adapter_status_patch,
        decide_adapter_action,
        parse_adapter_spec,
    )

    doc = yaml.safe_load((EXAMPLES / "loraadapter-replicas.yaml").read_text())
    spec = parse_adapter_spec(doc["metadata"]["name"], doc["spec"])
    observed = Observed(ServingAdapter("alice/pirate-speak@abc", spec.uri, spec.base_model,
                                       "abc" * 10, 100, ("r0", "r1")), replica_count=3)
    status = AdapterStatus(registered_source="hf://x")
    decision = decide_adapter_action(spec, status, observed)
    doc["status"] = adapter_status_patch(spec, status, decision, observed,
                                         datetime(2026, 1, 1, tzinfo=UTC))
    validate(doc)
    schema = crd_schemas()["LoRAAdapter"]["properties"]["status"]["properties"]
    assert set(doc["status"]) <= set(schema)


@pytest.mark.skipif(shutil.which("kubernetes-validate") is None
                    and not (Path(sys.executable).parent / "kubernetes-validate").exists(),
                    reason="kubernetes-validate is not installed")
def test_crds_pass_kubernetes_validate_strict(tmp_path: Path) -> None:
    exe = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent
                                                       / "kubernetes-validate")
    files = sorted(str(p) for p in CRD_DIR.glob("*.yaml"))
    result = subprocess.run([exe, "--strict", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files)

    # And --strict really looks: an unknown field in a CRD fails.
    bad = yaml.safe_load(Path(files[0]).read_text())
    bad["spec"]["scopee"] = "Namespaced"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = subprocess.run([exe, "--strict", str(tmp_path / "bad.yaml")], capture_output=True,
                            text=True)
    assert result.returncode != 0
