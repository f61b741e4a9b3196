"""``bench SCENARIO``: stock vLLM and LoRAFleet, one after the other, same seeded workloads.

Boundary: orchestration and I/O. Prepares the SmolLM2 model and random adapters (lazily, with
``lorafleet.serving.demo``), starts one system at a time on loopback (2 cores: never both at
once), runs every phase of the scenario, stops it, then writes ``<out-dir>/<system>.json``,
``comparison.json``, a plot, and prints ratios LoRAFleet / vLLM. CPU figures are only
meaningful as ratios.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lorafleet.loadtest.bench import overhead, overload, servers
from lorafleet.loadtest.bench.scenarios import (
    MODEL,
    TENANT,
    Scenario,
    _workload,
    adapter_shape,
    get_scenario,
    max_lora_rank,
)
from lorafleet.loadtest.compare import compare_results, ratio
from lorafleet.loadtest.errors import LoadTestError, ServerStartError
from lorafleet.loadtest.report import write_json, write_report
from lorafleet.loadtest.runner import run_workload
from lorafleet.serving.config import lora_slots
from lorafleet.serving.scheduling.metrics import read_counters

SYSTEMS = ("vllm", "lorafleet", "lorafleet-tokenflow", "lorafleet-stockops")
"""``lorafleet`` runs the stock (fcfs) scheduler; ``lorafleet-tokenflow`` the same build with
``--scheduling-policy tokenflow``; ``lorafleet-stockops`` the same build with vLLM's own CPU
LoRA ops (``LORAFLEET_STOCK_LORA_OPS=1``). The last two are opt-in (``--systems``)."""
READY_TIMEOUT_S = {"vllm": 240.0, "lorafleet": 420.0, "lorafleet-tokenflow": 420.0,
                   "lorafleet-stockops": 420.0}
# Extra ratio columns: (label, numerator system, denominator system).
RATIOS = (("lorafleet/vllm", "lorafleet", "vllm"),
          ("tokenflow/vllm", "lorafleet-tokenflow", "vllm"),
          ("tokenflow/fcfs", "lorafleet-tokenflow", "lorafleet"),
          ("ours/stock ops", "lorafleet", "lorafleet-stockops"))
CPU_NOTE = "CPU run (2 cores): absolute figures are not representative; compare ratios."


def prepare_assets(sc: Scenario, data_dir: Path, console: Console) -> tuple[Path, Path, Path]:
    """Base model dir, preloaded-adapters dir, cold-adapters dir (built once, reused)."""
    from lorafleet.serving.demo import make_random_adapter, prepare_base_model

    model_dir = Path(prepare_base_model(data_dir / "models" / MODEL))
    warm_dir = data_dir / "bench-adapters" / ("mixed" if sc.mixed_adapters else "warm")
    cold_dir = data_dir / "bench-adapters" / "cold"
    for folder, names in ((warm_dir, sc.adapters), (cold_dir, sc.cold_adapters)):
        for i, name in enumerate(names):
            out = folder / name
            rank, targets = adapter_shape(sc, i)
            if not (out / "adapter_config.json").exists():
                make_random_adapter(
                    model_dir, out, rank=rank, target_modules=list(targets),
                    seed=1000 + i + (500 if folder == cold_dir else 0), base_model_name=MODEL,
                )
    console.print(f"model {model_dir}; {len(sc.adapters)} adapters, {len(sc.cold_adapters)} cold")
    return model_dir, warm_dir, cold_dir


REGISTER_CONCURRENCY = 4
"""Adapter imports the harness sends at once (the server runs as many: servers.LoRAFleetOptions
``intake_concurrency``). One at a time, 128 adapters took ~5 minutes per run: each import is
a worker process that fetches and validates, then a load on the engine, and a single call
leaves the other core idle while the first waits."""


def register_adapters(admin: servers.AdminClient, tenant: str,
                      adapters: Sequence[tuple[str, Path, bool]],
                      concurrency: int = REGISTER_CONCURRENCY) -> float:
    """Import ``(name, source, load)`` adapters into ``tenant``, ``concurrency`` at a time;
    returns the seconds it took. The first failure is raised once every call has ended."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, concurrency),
                            thread_name_prefix="bench-register") as pool:
        futures = [pool.submit(admin.add_adapter, tenant, name, source, load)
                   for name, source, load in adapters]
        for fut in futures:
            fut.result()
    return time.monotonic() - t0


def _warmup(target: str, keys: dict[str, str | None]) -> None:
    """Two short base-model requests so one-time costs don't land in the first phase."""
    wl = _workload(
        name="warmup", seed=0, duration_s=60, max_requests=2, endpoint="chat",
        models={"entries": [{"model": MODEL}]}, arrival={"kind": "closed", "concurrency": 1},
        prompts={"words": {"dist": "constant", "value": 4}},
        max_tokens={"dist": "constant", "value": 4}, stream=True,
    )
    run_workload(wl, target, keys)


def _run_phases(
    system: str, sc: Scenario, target: str, keys: dict[str, str | None],
    out_dir: Path, console: Console, probe: overhead.Probe | None = None,
) -> dict[str, Any]:
    """Every phase of ``sc`` in turn; with a ``probe``, each phase's document carries its
    hop-by-hop breakdown (``overhead``)."""
    _warmup(target, keys)
    phases: dict[str, Any] = {}
    for phase in sc.phases:
        console.rule(f"{system}: {sc.name}/{phase.name}")
        # Streams tell LoRAFleet how fast their reader is (its scheduling extension); stock
        # vLLM gets the same requests without the extension.
        workload = phase.workload.model_copy(
            update={"declare_reader_rate": system.startswith("lorafleet")})
        before = probe.snapshot() if probe else None
        doc = run_workload(workload, target, keys, console=console,
                           meta={"system": system, "phase": phase.name})
        if probe and before:
            doc["overhead"] = overhead.breakdown(system, doc, before, probe.snapshot()).as_json()
        s = doc["summary"]
        console.print(
            f"  ok {s['ok']}/{s['requests']}  {s['output_tokens_per_s']:.1f} tok/s  "
            f"TTFT p50 {_seconds(s['ttft_s']['p50'])}  TPOT p50 {_seconds(s['tpot_s']['p50'])}  "
            f"errors {s['errors'] or 'none'}"
        )
        if s["errors"]:
            first = next(r for r in doc["requests"] if r["error"])
            console.print(f"  [yellow]first error:[/] {first['error']}")
        write_report(doc, out_dir / system / phase.name)
        phases[phase.name] = doc
    return phases


def run_system(
    system: str, sc: Scenario, model_dir: Path, warm_dir: Path, cold_dir: Path,
    out_dir: Path, console: Console, reserved_cpus: int = 0,
) -> dict[str, Any]:
    """Start ``system`` with the scenario's settings, set it up, run every phase, stop it.

    ``sc.max_loras`` ``None`` is the product's default: LoRAFleet gets no ``--max-loras`` and
    sizes its slots to the platform; stock vLLM, whose own default is one slot, gets the
    number LoRAFleet chooses, so both systems run the same slots."""
    port = servers.free_port()
    log = out_dir / "logs" / f"{system}.log"
    target = f"http://{servers.HOST}:{port}/v1"
    t0 = time.monotonic()
    extra: dict[str, Any] = {}
    slots = (sc.max_loras if sc.max_loras is not None
             else lora_slots(sc.max_num_seqs, sc.max_cpu_loras, gpu=False))
    # The engine knobs both systems get (servers.EngineKnobs), so a comparison is like for like.
    knobs: dict[str, Any] = dict(
        model_dir=model_dir, served_model_name=MODEL,
        max_loras=None if sc.max_loras is None and system != "vllm" else slots,
        max_lora_rank=max_lora_rank(sc), max_cpu_loras=sc.max_cpu_loras,
        reserved_cpus=reserved_cpus, max_num_seqs=sc.max_num_seqs,
        kv_cache_mib=sc.kv_cache_mib, max_model_len=sc.max_model_len,
    )
    if system == "vllm":
        cmd, env = servers.vllm_command(
            servers.VLLMOptions(
                **knobs, adapters={n: warm_dir / n for n in sc.adapters},
                resolver_dir=servers.resolver_view(
                    cold_dir, sc.cold_adapters, model_dir, out_dir / "vllm-resolver"
                ) if sc.cold_adapters else None,
            ),
            port,
        )
        with servers.running(system, cmd, env, port, log, READY_TIMEOUT_S[system]) as srv:
            ready_s = time.monotonic() - t0
            phases = _run_phases(system, sc, target, {TENANT: None}, out_dir, console,
                                 _probe(sc, system, srv, None))
    elif system.startswith("lorafleet"):
        admin_key = "bench-" + secrets.token_hex(16)  # servers refuse admin keys under 32 characters
        opts = servers.LoRAFleetOptions(
            **knobs, data_dir=out_dir / f"{system}-data", admin_key=admin_key,
            scheduling_policy="tokenflow" if system == "lorafleet-tokenflow" else "fcfs",
            stock_lora_ops=system == "lorafleet-stockops",
            ignore_eos_tenants=TENANT,  # the scenarios' workloads send ignore_eos, as to vLLM
        )
        cmd, env = servers.lorafleet_command(opts, port)
        with servers.running(system, cmd, env, port, log, READY_TIMEOUT_S[system]) as srv:
            ready_s = time.monotonic() - t0
            admin = servers.AdminClient(srv.base_url, admin_key)
            try:
                admin.create_tenant(TENANT)
                key = admin.create_key(TENANT)
                extra["register_s"] = register_adapters(
                    admin, TENANT,
                    [(n, warm_dir / n, True) for n in sc.adapters]
                    + [(n, cold_dir / n, False) for n in sc.cold_adapters],
                    concurrency=opts.intake_concurrency)
            finally:
                admin.close()
            n_adapters = len(sc.adapters) + len(sc.cold_adapters)
            if n_adapters:
                console.print(f"  registered {n_adapters} adapters in {extra['register_s']:.1f} s "
                              f"({opts.intake_concurrency} at a time)")
            phases = _run_phases(system, sc, target, {TENANT: key}, out_dir, console,
                                 _probe(sc, system, srv, admin_key))
            extra["server_counters"] = read_counters(servers.metrics_text(srv.base_url, admin_key))
            if extra["server_counters"]:
                console.print("  server: " + ", ".join(
                    f"{k} {v:g}" for k, v in extra["server_counters"].items()))
    else:
        raise LoadTestError(f"unknown system {system!r}; known: {SYSTEMS}")
    return {"scenario": sc.name, "system": system, "ready_s": ready_s, "note": CPU_NOTE,
            "reserved_cpus": reserved_cpus, "max_loras": slots,
            "max_loras_default": sc.max_loras is None, "phases": phases,
            **extra}


def _probe(sc: Scenario, system: str, srv: servers.Server, admin_key: str | None
           ) -> overhead.Probe | None:
    """The overhead scenario's per-phase snapshots of a server (none for other scenarios)."""
    if sc.name != "overhead":
        return None
    return overhead.Probe(system, srv.proc.pid,
                          lambda: servers.metrics_text(srv.base_url, admin_key or "none"))


def cold_start_figures(doc: dict[str, Any]) -> dict[str, float | None]:
    """Cold TTFT (mean of each phase's first request) vs warm TTFT (median of the others)."""
    from lorafleet.loadtest.metrics import percentile

    cold, warm = [], []
    for phase in doc["phases"].values():
        reqs = sorted(phase["requests"], key=lambda r: r["index"])
        ttfts = [r["metrics"]["ttft_s"] if r["error"] is None else None for r in reqs]
        if ttfts and ttfts[0] is not None:
            cold.append(ttfts[0])
        warm += [t for t in ttfts[1:] if t is not None]
    c = sum(cold) / len(cold) if cold else None
    w = percentile(warm, 50)
    return {"cold TTFT s": c, "warm TTFT p50 s": w, "cold/warm": ratio(w, c)}


def compare_systems(sc: Scenario, base: dict[str, Any], cand: dict[str, Any]) -> dict[str, Any]:
    """Per phase: overall comparison lorafleet / vllm (plus cold-start figures)."""
    out: dict[str, Any] = {"scenario": sc.name, "ratio": "lorafleet / vllm", "note": CPU_NOTE,
                           "phases": {}}
    for name in base["phases"]:
        if name in cand["phases"]:
            out["phases"][name] = compare_results(
                base["phases"][name], cand["phases"][name], "vllm", "lorafleet"
            )
    if sc.name == "cold-start":
        fb, fc = cold_start_figures(base), cold_start_figures(cand)
        out["cold_start"] = {
            k: {"a": fb[k], "b": fc[k], "ratio": ratio(fb[k], fc[k])} for k in fb
        }
    return out


def compare_results_by_phase(base: dict[str, Any], cand: dict[str, Any]) -> dict[str, Any]:
    """Per phase: tokenflow / fcfs on the same LoRAFleet build."""
    return {"ratio": "lorafleet-tokenflow / lorafleet (fcfs)", "note": CPU_NOTE, "phases": {
        name: compare_results(base["phases"][name], cand["phases"][name], "fcfs", "tokenflow")
        for name in base["phases"] if name in cand["phases"]
    }}


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} s"


def _headline_rows(sc: Scenario, docs: dict[str, dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """(label, [value per system]) rows of the scenario's headline figures."""
    from lorafleet.loadtest.compare import FIGURES, metric

    paths = {label: path for label, path, _ in FIGURES}
    rows: list[tuple[str, list[Any]]] = []
    if sc.name == "cold-start":
        figs = {s: cold_start_figures(d) for s, d in docs.items()}
        for label in sc.headline:
            rows.append((label, [figs[s][label] for s in docs]))
        return rows
    first = next(iter(docs.values()))
    for phase in first["phases"]:
        for label in sc.headline:
            vals = []
            for d in docs.values():
                p = d["phases"].get(phase)
                vals.append(metric(p["summary"], paths[label]) if p else None)
            rows.append((f"{phase}: {label}", vals))
    return rows


RELATIVE_FIGURES = ("tok/s vs base", "TTFT p50 vs base", "TTFT p99 vs base")


def relative_to_base(docs: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per system and adapter phase: output tok/s and TTFT p50 and p99 over the same system's
    ``base`` phase (how close adapters come to base-model speed on one server; issue 20's
    goals are stated in these ratios)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for system, doc in docs.items():
        base = doc["phases"].get("base")
        if base is None:
            continue
        b = base["summary"]
        out[system] = {
            name: {
                "tok/s vs base": ratio(b["output_tokens_per_s"], p["summary"]["output_tokens_per_s"]),
                "TTFT p50 vs base": ratio(b["ttft_s"]["p50"], p["summary"]["ttft_s"]["p50"]),
                "TTFT p99 vs base": ratio(b["ttft_s"]["p99"], p["summary"]["ttft_s"]["p99"]),
            }
            for name, p in doc["phases"].items() if name != "base"
        }
    return out


def print_relative(rel: dict[str, dict[str, dict[str, float | None]]], console: Console) -> None:
    table = Table(title="relative to base-model-only traffic on the same server")
    table.add_column("phase")
    for system in rel:
        for label in RELATIVE_FIGURES:
            table.add_column(f"{system} {label.removesuffix(' vs base')}", justify="right")
    phases = next(iter(rel.values()))
    for phase in phases:
        cells = []
        for system in rel:
            fig = rel[system].get(phase, {})
            cells += ["-" if fig.get(k) is None else f"{fig[k]:.2f}x"
                      for k in RELATIVE_FIGURES]
        table.add_row(phase, *cells)
    console.print(table)


def print_table(sc: Scenario, docs: dict[str, dict[str, Any]], console: Console) -> None:
    table = Table(title=f"bench {sc.name}: {sc.description}")
    table.add_column("figure")
    for system in docs:
        table.add_column(system, justify="right")
    names = list(docs)
    ratios = [(lbl, names.index(a), names.index(b)) for lbl, a, b in RATIOS if a in docs and b in docs]
    for lbl, _, _ in ratios:
        table.add_column(lbl, justify="right")
    for label, vals in _headline_rows(sc, docs):
        cells = ["-" if v is None else f"{v:.3g}" for v in vals]
        for _, a, b in ratios:
            r = ratio(vals[b], vals[a])  # ratio(base, candidate) = candidate / base
            cells.append("-" if r is None else f"{r:.2f}x")
        table.add_row(label, *cells)
    console.print(table)
    console.print(CPU_NOTE)


def plot(sc: Scenario, docs: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _headline_rows(sc, docs)
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(7, 1.1 * len(rows) + 0.5), squeeze=False, layout="constrained"
    )
    for ax, (label, vals) in zip(axes[:, 0], rows, strict=True):
        colors = ["tab:gray", "tab:blue", "tab:green", "tab:orange"][: len(vals)]
        ax.barh(list(docs), [v or 0 for v in vals], color=colors)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{sc.name} ({CPU_NOTE})", fontsize=8)  # constrained layout keeps it clear
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_bench(
    scenario: str, *, out_dir: Path, quick: bool, systems: list[str], data_dir: Path,
    console: Console, reserved_cpus: int = 0, max_loras: int | None = None,
) -> dict[str, Any]:
    """Run a scenario on each system in turn; write results, comparison and plot.

    ``max_loras`` replaces the scenario's slot count for every system (``None``: keep it)."""
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise LoadTestError(f"systems must be among {SYSTEMS}, got {systems}")
    try:
        sc = get_scenario(scenario, quick)
    except ValueError as exc:
        raise LoadTestError(str(exc)) from None
    if max_loras is not None:
        sc = dataclasses.replace(sc, max_loras=max_loras)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]bench {sc.name}[/] ({'quick' if quick else 'full'}): {sc.description}"
                  + ("" if sc.max_loras is None else f"; {sc.max_loras} adapter slots"))
    console.print(CPU_NOTE)
    model_dir, warm_dir, cold_dir = prepare_assets(sc, data_dir.resolve(), console)
    docs: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    for system in [s for s in SYSTEMS if s in systems]:
        try:
            docs[system] = run_system(system, sc, model_dir, warm_dir, cold_dir, out_dir, console,
                                      reserved_cpus=reserved_cpus)
        except ServerStartError as exc:
            console.print(f"[red]{system} failed:[/] {exc}")
            continue
        write_json(docs[system], out_dir / f"{system}.json")
    if not docs:
        raise LoadTestError("no system could be benchmarked (see the errors above)")
    if {"vllm", "lorafleet"} <= set(docs):
        cmp = compare_systems(sc, docs["vllm"], docs["lorafleet"])
        (out_dir / "comparison.json").write_text(json.dumps(cmp, indent=1))
    if {"lorafleet", "lorafleet-tokenflow"} <= set(docs):
        cmp = compare_results_by_phase(docs["lorafleet"], docs["lorafleet-tokenflow"])
        (out_dir / "comparison-tokenflow.json").write_text(json.dumps(cmp, indent=1))
    print_table(sc, docs, console)
    if sc.name == "multi-lora":
        rel = relative_to_base(docs)
        (out_dir / "relative-to-base.json").write_text(json.dumps(rel, indent=1))
        print_relative(rel, console)
    if sc.name == "overload":
        overload.report(docs, out_dir, console)
    if sc.name == "overhead":
        hops = overhead.report(docs, console)
        (out_dir / "overhead-breakdown.json").write_text(json.dumps(hops, indent=1))
    png = plot(sc, docs, out_dir / f"{sc.name}.png")
    console.print(f"results in {out_dir} ({png.name}); took {time.monotonic() - t0:.0f} s")
    return docs
