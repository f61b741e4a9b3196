"""The ``overload`` family's report: ratios against demand/capacity, and decisions by reason.

Boundary: reads the per-system result documents ``bench overload`` wrote
(``<out-dir>/<system>.json``), prints a table, writes ``overload-family.json`` and
``overload-family.png``. Pure arithmetic in :func:`family`; I/O in :func:`report` and
:func:`main`.

Per phase (one load point): the demand is the sum of the phase's readers' rates (tokens/s
they would read if every stream kept up); capacity is what LoRAFleet fcfs generated in that
phase (under overload fcfs runs every stream, so its output rate is the engine's throughput at
that batch), and the nominal ratio is the scenario's. Ratios are tokenflow / fcfs and
tokenflow / stock vLLM for: effective (on-time) tokens/s, TTFT p99, total reader stall and
output tokens/s, beside issue 20's goals.

``python -m lorafleet.loadtest.bench.overload OUT_DIR`` rebuilds the report from a finished run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lorafleet.loadtest.bench.scenarios import OVERLOAD_CAPACITY_TOK_S
from lorafleet.loadtest.compare import metric, ratio

FCFS, FLOW, VLLM = "lorafleet", "lorafleet-tokenflow", "vllm"
FIGURES = (
    # (label, summary path, goal for tokenflow / fcfs, higher is better)
    ("effective tok/s", ("effective_tokens_per_s",), 1.8, True),
    ("TTFT p99 s", ("ttft_s", "p99"), 0.5, False),
    ("stall s total", ("stall_s_total",), 0.3, False),
    ("output tok/s", ("output_tokens_per_s",), 0.95, True),
    ("on-schedule tok/s", ("on_schedule_tokens_per_s",), None, True),
)


def demand_tok_s(phase: dict[str, Any]) -> float:
    """Tokens/s the phase's readers ask together (every stream, as if all kept up)."""
    return sum(float(r.get("reader_rate") or 0.0) for r in phase.get("requests", [])
               if r.get("stream", True))


def family(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rows per phase: demand, demand/capacity, each system's figures and the ratios."""
    ref = docs.get(FCFS) or next(iter(docs.values()))
    rows = []
    for name, phase in ref["phases"].items():
        demand = demand_tok_s(phase)
        fcfs_out = metric(phase["summary"], ("output_tokens_per_s",))
        row: dict[str, Any] = {
            "phase": name,
            "streams": len(phase.get("requests", [])),
            "demand tok/s": demand,
            "demand/capacity (nominal)": demand / OVERLOAD_CAPACITY_TOK_S,
            "demand/capacity (fcfs measured)": (demand / fcfs_out) if fcfs_out else None,
            "systems": {},
            "ratios": {},
        }
        for system, doc in docs.items():
            p = doc["phases"].get(name)
            if p is not None:
                row["systems"][system] = {label: metric(p["summary"], path)
                                          for label, path, _, _ in FIGURES}
        for label, _, _, _ in FIGURES:
            vals = {s: v[label] for s, v in row["systems"].items()}
            if FLOW in vals:
                row["ratios"][label] = {
                    "tokenflow/fcfs": ratio(vals.get(FCFS), vals[FLOW]),
                    "tokenflow/vllm": ratio(vals.get(VLLM), vals[FLOW]),
                }
        rows.append(row)
    decisions = {s: {k: v for k, v in (doc.get("server_counters") or {}).items()
                     if "decisions" in k or k.endswith(("pauses", "resumes"))}
                 for s, doc in docs.items() if s.startswith("lorafleet")}
    goals = {label: goal for label, _, goal, _ in FIGURES if goal is not None}
    return {"scenario": "overload", "capacity_nominal_tok_s": OVERLOAD_CAPACITY_TOK_S,
            "goals tokenflow/fcfs": goals, "rows": rows, "server_counters": decisions}


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def print_family(fam: dict[str, Any], console: Console) -> None:
    """One table per figure: a row per load point, a column per system and the ratios."""
    systems = sorted({s for r in fam["rows"] for s in r["systems"]})
    for label, _, goal, _ in FIGURES:
        table = Table(title=f"bench overload: {label}")
        for col in ("phase", "streams", "demand/cap", "measured", *systems,
                    "tf/fcfs" + (f" (goal {goal:g})" if goal else ""), "tf/vllm"):
            table.add_column(col, justify="right")
        for r in fam["rows"]:
            rat = r["ratios"].get(label, {})
            table.add_row(
                r["phase"], str(r["streams"]), _fmt(r["demand/capacity (nominal)"], ".2f"),
                _fmt(r["demand/capacity (fcfs measured)"], ".2f"),
                *(_fmt(r["systems"].get(s, {}).get(label)) for s in systems),
                _fmt(rat.get("tokenflow/fcfs"), ".2f"), _fmt(rat.get("tokenflow/vllm"), ".2f"))
        console.print(table)
    for system, counters in fam["server_counters"].items():
        if counters:
            console.print(f"{system} decisions: " + ", ".join(
                f"{k.removeprefix('lorafleet_scheduler_')} {v:g}" for k, v in counters.items()))


def plot_family(fam: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in fam["rows"] if r["demand/capacity (fcfs measured)"] is not None] or fam["rows"]
    key = ("demand/capacity (fcfs measured)" if rows and rows[0]["demand/capacity (fcfs measured)"]
           is not None else "demand/capacity (nominal)")
    xs = [r[key] for r in rows]
    fig, axes = plt.subplots(1, len(FIGURES) - 1, figsize=(4 * (len(FIGURES) - 1), 3.4),
                             squeeze=False, layout="constrained")
    for ax, (label, _, goal, _) in zip(axes[0], FIGURES[:-1], strict=True):
        for which, style in (("tokenflow/fcfs", "o-"), ("tokenflow/vllm", "s--")):
            ys = [r["ratios"].get(label, {}).get(which) for r in rows]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=which)
        ax.axhline(1.0, color="gray", lw=0.8)
        if goal is not None:
            ax.axhline(goal, color="tab:red", lw=0.8, ls=":", label=f"goal {goal:g}")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel("ratio", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("overload family (2-core CPU, SmolLM2-135M): ratios against demand/capacity",
                 fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(docs: dict[str, dict[str, Any]], out_dir: Path, console: Console) -> dict[str, Any]:
    """Print the family table, write ``overload-family.json`` and ``overload-family.png``."""
    fam = family(docs)
    (out_dir / "overload-family.json").write_text(json.dumps(fam, indent=1))
    print_family(fam, console)
    png = plot_family(fam, out_dir / "overload-family.png")
    console.print(f"family report: {out_dir / 'overload-family.json'}, {png}")
    return fam


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="where `bench overload` wrote <system>.json")
    args = parser.parse_args(argv)
    docs = {s: json.loads((args.out_dir / f"{s}.json").read_text())
            for s in (VLLM, FCFS, FLOW) if (args.out_dir / f"{s}.json").exists()}
    if not docs:
        print(f"no results in {args.out_dir}", file=sys.stderr)
        return 2
    report(docs, args.out_dir, Console(width=240))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
