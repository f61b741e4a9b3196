"""Reading the Grafana dashboard's queries as Prometheus would run them (test helper)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "charts/lorafleet/files/grafana-dashboard.json"
RULES = Path(__file__).resolve().parents[2] / "charts/lorafleet/files/prometheus-rules.yaml"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def exprs(d: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(d) if p["type"] != "row" for t in p["targets"]]


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables the way Grafana does with "All" selected."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    return re.sub(r"\$(namespace|tenant|adapter)\b", ".*", expr)
