"""Command line: ``loadtest run``, ``loadtest compare`` and ``bench``.

:func:`register` adds the commands to an argparse subparsers object (the main ``lorafleet``
CLI calls it); ``python -m lorafleet.loadtest`` builds its own parser with it. Each command is
set as ``func`` on its parser and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from lorafleet.loadtest.bench.scenarios import SCENARIOS as SERVER_SCENARIOS
from lorafleet.loadtest.errors import LoadTestError

SCENARIOS = (*SERVER_SCENARIOS, "lora-ops", "fairness")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``loadtest {run,compare}`` and ``bench`` to ``subparsers``."""
    lt = subparsers.add_parser("loadtest", help="load-test an OpenAI-compatible endpoint")
    lt_sub = lt.add_subparsers(dest="loadtest_command", required=True)

    run = lt_sub.add_parser("run", help="run a workload file against a target")
    run.add_argument("--target", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    run.add_argument("--workload", required=True, type=Path, help="workload YAML file")
    run.add_argument("--out", type=Path, default=Path("results.json"), help="results JSON")
    run.add_argument("--report-dir", type=Path, help="write plots and index.html here")
    run.add_argument("--api-key", help="key for tenants that give no api_key/api_key_env")
    run.set_defaults(func=cmd_run)

    cmp = lt_sub.add_parser("compare", help="compare two results files (ratios B/A)")
    cmp.add_argument("a", type=Path, help="baseline results JSON")
    cmp.add_argument("b", type=Path, help="candidate results JSON")
    cmp.add_argument("--out", type=Path, help="write the comparison JSON here")
    cmp.set_defaults(func=cmd_compare)

    bench = subparsers.add_parser(
        "bench", help="start stock vLLM and LoRAFleet on loopback and compare them"
    )
    bench.add_argument("scenario", choices=SCENARIOS)
    bench.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    bench.add_argument("--quick", action="store_true", help="a ~2-minute version")
    bench.add_argument(
        "--systems", default="vllm,lorafleet",
        help="comma-separated subset of vllm,lorafleet,lorafleet-tokenflow,lorafleet-stockops "
        "(default vllm,lorafleet)",
    )
    bench.add_argument("--data-dir", type=Path, default=Path(".lorafleet"),
                       help="where the model and bench adapters are prepared")
    bench.add_argument("--reserved-cpus", type=int, default=0,
                       help="VLLM_CPU_NUM_OF_RESERVED_CPU for every system (default 0: all "
                       "cores compute; vLLM's own default is 1)")
    bench.add_argument("--max-loras", type=int,
                       help="adapter slots per batch for every system (default: the "
                       "scenario's; multi-lora: LoRAFleet's platform default)")
    bench.add_argument("--threads", type=int,
                       help="lora-ops only: torch threads (default: all cores)")
    bench.set_defaults(func=cmd_bench)

    from lorafleet.loadtest.soak import register as register_soak

    register_soak(subparsers)


def cmd_run(args: argparse.Namespace) -> int:
    from lorafleet.loadtest.report import summary_table, write_json, write_report
    from lorafleet.loadtest.runner import run_workload
    from lorafleet.loadtest.workload import load_workload, resolve_api_keys

    console = _console()
    try:
        workload, trace = load_workload(args.workload)
        keys = resolve_api_keys(workload, default=args.api_key)
        doc = run_workload(workload, args.target, keys, trace=trace, console=console)
    except LoadTestError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    write_json(doc, args.out)
    console.print(summary_table(doc, title=f"{workload.name} -> {args.target}"))
    console.print(f"results: {args.out}")
    if args.report_dir:
        page = write_report(doc, args.report_dir)
        console.print(f"report: {page}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lorafleet.loadtest.compare import compare_results, comparison_table
    from lorafleet.loadtest.report import load_results

    console = _console()
    try:
        a, b = load_results(args.a), load_results(args.b)
    except LoadTestError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    cmp = compare_results(a, b, args.a.stem, args.b.stem)
    console.print(comparison_table(cmp["overall"], args.a.stem, args.b.stem))
    if args.out:
        args.out.write_text(json.dumps(cmp, indent=1))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lorafleet.loadtest.bench.harness import run_bench

    console = _console()
    if args.scenario == "lora-ops":  # in-process microbenchmark, no servers
        from lorafleet.loadtest.bench.lora_ops import run_lora_ops

        run_lora_ops(args.out_dir, quick=args.quick, console=console, threads=args.threads)
        return 0
    if args.scenario == "fairness":  # one LoRAFleet server, two tenants (--systems unused)
        from lorafleet.loadtest.bench.fairness import run_fairness

        try:
            run_fairness(args.out_dir, quick=args.quick, data_dir=args.data_dir,
                         console=console, reserved_cpus=args.reserved_cpus)
        except LoadTestError as exc:
            console.print(f"[red]error:[/] {exc}")
            return 2
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    try:
        run_bench(args.scenario, out_dir=args.out_dir, quick=args.quick, systems=systems,
                  data_dir=args.data_dir, console=console, reserved_cpus=args.reserved_cpus,
                  max_loras=args.max_loras)
    except LoadTestError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lorafleet.loadtest")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def _console() -> Console:
    """A console; wide enough for the tables when the output is not a terminal."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=170)
