"""Results file, summary table, plots and an HTML page.

Boundary: :func:`build_results` is pure (records -> JSON-ready dict); ``write_*``/``load_*``
do the file I/O; :func:`summary_table` builds a rich table; :func:`write_plots` draws PNGs with
matplotlib's Agg backend (no display needed) and :func:`write_html` embeds them.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from lorafleet.loadtest.errors import LoadTestError
from lorafleet.loadtest.metrics import (
    SLO,
    RequestMetrics,
    RequestRecord,
    request_metrics,
    summarize,
    summarize_by,
    throughput_timeline,
)

RESULTS_VERSION = 1


def _finite(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else value


def pair_up(records: list[RequestRecord], slo: SLO) -> list[tuple[RequestRecord, RequestMetrics]]:
    return [(r, request_metrics(r, slo)) for r in records]


def build_results(
    records: list[RequestRecord],
    *,
    duration_s: float,
    slo: SLO,
    meta: dict[str, Any],
    not_sent: int = 0,
) -> dict[str, Any]:
    """The results document: metadata, overall / per-tenant / per-adapter summaries, requests."""
    pairs = pair_up(records, slo)
    requests = []
    for rec, met in pairs:
        row = dataclasses.asdict(rec)
        row["token_times"] = [round(t, 5) for t in rec.token_times]
        row["reader_rate"] = _finite(rec.reader_rate)
        metrics = dataclasses.asdict(met)
        metrics["itls_s"] = [round(t, 5) for t in met.itls_s]
        row["metrics"] = metrics
        requests.append(row)
    return {
        "version": RESULTS_VERSION,
        "meta": {**meta, "not_sent": not_sent, "slo": dataclasses.asdict(slo)},
        "summary": dataclasses.asdict(summarize(pairs, duration_s)),
        "by_tenant": {
            k: dataclasses.asdict(v)
            for k, v in summarize_by(pairs, duration_s, lambda r: r.tenant).items()
        },
        "by_adapter": {
            k: dataclasses.asdict(v)
            for k, v in summarize_by(pairs, duration_s, lambda r: r.adapter).items()
        },
        "timeline": throughput_timeline(pairs, bin_s=1.0, duration_s=duration_s),
        "requests": requests,
    }


def records_from_results(doc: dict[str, Any]) -> list[RequestRecord]:
    """Rebuild the request records of a results document."""
    names = {f.name for f in dataclasses.fields(RequestRecord)}
    out = []
    for row in doc.get("requests", []):
        kwargs = {k: v for k, v in row.items() if k in names}
        kwargs["token_times"] = tuple(kwargs.get("token_times") or ())
        if kwargs.get("reader_rate") is None:
            kwargs["reader_rate"] = math.inf
        out.append(RequestRecord(**kwargs))
    return out


def write_json(doc: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LoadTestError(f"cannot read results {path}: {exc}") from None
    if not isinstance(doc, dict) or "summary" not in doc:
        raise LoadTestError(f"{path} is not a loadtest results file (no 'summary')")
    return doc


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def summary_table(doc: dict[str, Any], title: str = "load test") -> Table:
    """Overall, per-tenant and per-adapter rows: counts, rates, latency percentiles, QoE."""
    table = Table(title=title)
    for col in (
        "group", "req", "ok", "err", "tok/s", "eff tok/s", "TTFT p50/p99 ms",
        "TPOT p50/p99 ms", "ITL p99 ms", "e2e p50 s", "stall s", "SLO %",
    ):
        table.add_column(col, justify="left" if col == "group" else "right")

    def row(name: str, s: dict[str, Any]) -> None:
        slo = s["slo_attainment"]
        table.add_row(
            name,
            str(s["requests"]),
            str(s["ok"]),
            str(s["requests"] - s["ok"]),
            f"{s['output_tokens_per_s']:.1f}",
            f"{s['effective_tokens_per_s']:.1f}",
            f"{_ms(s['ttft_s']['p50'])}/{_ms(s['ttft_s']['p99'])}",
            f"{_ms(s['tpot_s']['p50'])}/{_ms(s['tpot_s']['p99'])}",
            _ms(s["itl_s"]["p99"]),
            "-" if s["e2e_s"]["p50"] is None else f"{s['e2e_s']['p50']:.2f}",
            f"{s['stall_s_total']:.1f}",
            "-" if slo is None else f"{slo * 100:.0f}",
        )

    row("overall", doc["summary"])
    for name, s in doc.get("by_tenant", {}).items():
        row(f"tenant {name}", s)
    for name, s in doc.get("by_adapter", {}).items():
        row(f"model {name}", s)
    return table


def write_plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """PNG plots: TTFT/TPOT distributions, throughput and latency over time, breakdowns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reqs = [r for r in doc.get("requests", []) if r["status"] == 200 and r["error"] is None]
    files: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, label in ((axes[0], "ttft_s", "TTFT (s)"), (axes[1], "tpot_s", "TPOT (s)")):
        vals = [r["metrics"][key] for r in reqs if r["metrics"][key] is not None]
        if vals:
            ax.hist(vals, bins=min(40, max(5, len(vals) // 2)))
        ax.set_xlabel(label)
        ax.set_ylabel("requests")
    save(fig, "latency_distributions.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    timeline = doc.get("timeline", [])
    axes[0].plot([t for t, _ in timeline], [v for _, v in timeline])
    axes[0].set_xlabel("time (s)")
    axes[0].set_ylabel("output tokens/s")
    starts = [r["start_s"] for r in reqs if r["metrics"]["ttft_s"] is not None]
    ttfts = [r["metrics"]["ttft_s"] for r in reqs if r["metrics"]["ttft_s"] is not None]
    axes[1].scatter(starts, ttfts, s=8, label="TTFT")
    e2e_starts = [r["start_s"] for r in reqs if r["e2e_s"] is not None]
    axes[1].scatter(e2e_starts, [r["e2e_s"] for r in reqs if r["e2e_s"] is not None],
                    s=8, label="e2e")
    axes[1].set_xlabel("request start (s)")
    axes[1].set_ylabel("latency (s)")
    axes[1].legend()
    save(fig, "over_time.png")

    for group in ("by_tenant", "by_adapter"):
        items = doc.get(group, {})
        if not items:
            continue
        names = list(items)
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.8 + 0.3 * max(4, len(names))))
        ys = range(len(names))
        axes[0].barh(ys, [items[n]["output_tokens_per_s"] for n in names], label="output")
        axes[0].barh(ys, [items[n]["effective_tokens_per_s"] for n in names],
                     height=0.4, label="effective")
        axes[0].set_yticks(list(ys), names)
        axes[0].set_xlabel("tokens/s")
        axes[0].legend()
        p50 = [items[n]["ttft_s"]["p50"] or 0 for n in names]
        p99 = [items[n]["ttft_s"]["p99"] or 0 for n in names]
        axes[1].barh(ys, p99, label="p99")
        axes[1].barh(ys, p50, height=0.4, label="p50")
        axes[1].set_yticks(list(ys), [""] * len(names))
        axes[1].set_xlabel("TTFT (s)")
        axes[1].legend()
        save(fig, f"{group}.png")
    return files


def write_html(doc: dict[str, Any], plots: list[Path], out_dir: str | Path) -> Path:
    """A static page with the summary and the plots (relative links)."""
    out = Path(out_dir)
    s = doc["summary"]
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>"
        for k, v in s.items()
    )
    imgs = "".join(f'<p><img src="{html.escape(p.name)}"></p>' for p in plots)
    meta = html.escape(json.dumps(doc.get("meta", {}), indent=1))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>LoRAFleet load test</title>"
        "</head><body><h1>LoRAFleet load test</h1>"
        f"<pre>{meta}</pre><table border=1>{rows}</table>{imgs}</body></html>"
    )
    path = out / "index.html"
    path.write_text(page)
    return path


def write_report(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """Plots and the HTML page into ``out_dir``; returns the page's path."""
    plots = write_plots(doc, out_dir)
    return write_html(doc, plots, out_dir)
