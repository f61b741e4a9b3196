"""Side-by-side comparison of two results files: values and ratios (B / A).

Boundary: :func:`compare_summaries` and :func:`compare_results` are pure; the CLI reads the
files and prints :func:`comparison_table`.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

# (label, path into a summary, higher_is_better)
FIGURES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("output tok/s", ("output_tokens_per_s",), True),
    ("effective tok/s", ("effective_tokens_per_s",), True),
    ("on-schedule tok/s", ("on_schedule_tokens_per_s",), True),
    ("requests/s", ("requests_per_s",), True),
    ("TTFT p50 s", ("ttft_s", "p50"), False),
    ("TTFT p90 s", ("ttft_s", "p90"), False),
    ("TTFT p99 s", ("ttft_s", "p99"), False),
    ("TPOT p50 s", ("tpot_s", "p50"), False),
    ("TPOT p99 s", ("tpot_s", "p99"), False),
    ("ITL p99 s", ("itl_s", "p99"), False),
    ("e2e p50 s", ("e2e_s", "p50"), False),
    ("e2e p99 s", ("e2e_s", "p99"), False),
    ("stall s total", ("stall_s_total",), False),
    ("stalled requests", ("stalled_requests",), False),
    ("SLO attainment", ("slo_attainment",), True),
    ("failed requests", ("failed",), False),
)


def metric(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    """The number at ``path`` in a run's summary; ``None`` where it has none. ``("failed",)``
    is derived (requests that did not end ok)."""
    if path == ("failed",):
        return float(summary["requests"] - summary["ok"])
    value: Any = summary
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return None if value is None else float(value)


def ratio(a: float | None, b: float | None) -> float | None:
    """``b / a``; ``None`` when either is missing or ``a`` is 0 (unless both are 0: 1.0)."""
    if a is None or b is None:
        return None
    if a == 0:
        return 1.0 if b == 0 else None
    return b / a


def compare_summaries(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """figure -> {a, b, ratio (b/a), diff (b-a), higher_is_better}."""
    out: dict[str, dict[str, Any]] = {}
    for label, path, higher in FIGURES:
        va, vb = metric(a, path), metric(b, path)
        out[label] = {
            "a": va,
            "b": vb,
            "ratio": ratio(va, vb),
            "diff": None if va is None or vb is None else vb - va,
            "higher_is_better": higher,
        }
    return out


def compare_results(
    a: dict[str, Any], b: dict[str, Any], a_name: str = "A", b_name: str = "B"
) -> dict[str, Any]:
    """Overall and per-adapter / per-tenant comparisons (groups present in both)."""
    doc: dict[str, Any] = {
        "a": a_name,
        "b": b_name,
        "ratio": f"{b_name} / {a_name}",
        "overall": compare_summaries(a["summary"], b["summary"]),
    }
    for group in ("by_adapter", "by_tenant"):
        common = sorted(set(a.get(group, {})) & set(b.get(group, {})))
        doc[group] = {k: compare_summaries(a[group][k], b[group][k]) for k in common}
    return doc


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def comparison_table(cmp: dict[str, dict[str, Any]], a_name: str, b_name: str,
                     title: str = "") -> Table:
    """Rows: figure, A, B, B/A (green when B is better, red when worse by > 5 %)."""
    table = Table(title=title or f"{b_name} vs {a_name}")
    table.add_column("figure")
    table.add_column(a_name, justify="right")
    table.add_column(b_name, justify="right")
    table.add_column(f"{b_name}/{a_name}", justify="right")
    for label, row in cmp.items():
        r = row["ratio"]
        text = _fmt(r)
        if r is not None and abs(r - 1) > 0.05:
            better = (r > 1) == row["higher_is_better"]
            text = f"[{'green' if better else 'red'}]{text}[/]"
        table.add_row(label, _fmt(row["a"]), _fmt(row["b"]), text)
    return table
