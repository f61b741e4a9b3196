"""The ``lorafleet`` command: serve, demo keys, administration, load tests, operator.

Boundary: argument parsing and printing. ``serve`` wires settings into ``deploy``; the
admin commands are thin clients of the admin HTTP API of a running server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError

DEFAULT_URL = "http://127.0.0.1:8000"


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="Run the serving tier (Ray Serve + vLLM) on this machine.")
    demo = p.add_mutually_exclusive_group()
    demo.add_argument("--demo", dest="demo", action="store_true", default=None,
                      help="Prepare and serve the embedded demo (default without --model-dir).")
    demo.add_argument("--no-demo", dest="demo", action="store_false",
                      help="Serve only what the registry holds.")
    p.add_argument("--host", default=None, help="Listen address (default 127.0.0.1).")
    p.add_argument("--port", type=int, default=None, help="Listen port (default 8000).")
    p.add_argument("--model-dir", default=None, help="Base model directory (HF layout).")
    p.add_argument("--served-model-name", default=None, help="Base model name in the API.")
    p.add_argument("--data-dir", default=None, help="Models, cache, registry (default .lorafleet).")
    p.add_argument("--registry", dest="registry_url", default=None,
                   help="sqlite:///path or redis://host:port/db (default SQLite in data dir).")
    p.add_argument("--admin-key", default=None, help="Admin credential (or LORAFLEET_ADMIN_KEY).")
    p.add_argument("--replicas", type=int, default=None, help="Engine replicas (default 1).")
    p.add_argument("--public-metrics", action="store_true", default=None,
                   help="Serve /metrics without a credential (it names tenants and adapters).")
    p.add_argument("--api-docs", action="store_true", default=None,
                   help="Serve /docs, /redoc and /openapi.json (off by default: they map "
                   "every route, the admin API's included).")
    p.add_argument("--admin-port", type=int, default=None,
                   help="Serve the admin API on this port only (same host), not on --port.")
    p.add_argument("--ignore-eos-tenants", default=None,
                   help="Tenants allowed ignore_eos: comma-separated names, or '*' for all "
                   "(default: nobody).")
    p.add_argument("--tool-call-parser", default=None,
                   help="vLLM tool parser for tool_choice 'auto' (e.g. hermes); default none.")
    p.add_argument("--ray-address", default=None, help="Attach to this Ray cluster.")
    p.add_argument("--adapter-store", default=None,
                   help="Shared adapter store every node reads: s3://bucket/prefix or "
                   "file:///dir (or LORAFLEET_ADAPTER_STORE; default: none, fetch from sources).")
    p.add_argument("--adapter-secrets-dir", default=None,
                   help="Mounted secretRef credentials, <dir>/<secret>/<KEY> "
                   "(default <data-dir>/secrets).")
    engine_flags(p)
    p.add_argument("--ingress-replicas", type=int, default=None,
                   help="Ingress replicas (HTTP front; default 1).")
    p.set_defaults(func=cmd_serve)


def engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``EngineSettings`` field: ``--<name-with-dashes>`` (or the field's ``flag``),
    its type, choices, default and help all read from the field, so a flag cannot drift from
    the setting it sets. A dict field is a repeatable ``NAME=VALUE`` flag."""
    from .config import EngineSettings

    group = parser.add_argument_group("engine settings (config.EngineSettings)")
    for name, field in EngineSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        kind = _flag_kind(field.annotation)
        if kind.get("action") == "append":
            default = sorted(default.items())
        shown = "" if default in (None, []) else f" (default: {default})"
        group.add_argument(
            _flag_of(name), dest=name, default=default,
            help=(field.description or "").replace("%", "%%") + shown, **kind)


def _flag_of(name: str) -> str:
    from .config import EngineSettings

    extra = EngineSettings.model_fields[name].json_schema_extra
    flag = extra.get("flag") if isinstance(extra, dict) else None
    return str(flag) if flag else "--" + name.replace("_", "-")


def _flag_kind(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field's type: its parser, or its choices."""
    from .config import GpuRequest

    if annotation == GpuRequest:
        return {"type": _gpu_request, "metavar": "N|auto"}
    origin = get_origin(annotation)
    if origin is Literal:
        return {"choices": get_args(annotation)}
    if origin is dict:
        return {"action": "append", "type": _name_value, "metavar": "NAME=VALUE"}
    if origin in (Union, UnionType):
        (only,) = [a for a in get_args(annotation) if a is not type(None)]
        return _flag_kind(only)
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"no command-line flag for a setting of type {annotation}")


def engine_settings(args: argparse.Namespace) -> Any:
    """The ``EngineSettings`` that the engine flags in ``args`` give."""
    from .config import EngineSettings

    given = {name: getattr(args, name) for name in EngineSettings.model_fields}
    given["scheduling_params"] = dict(given["scheduling_params"])
    return EngineSettings(**given)


def _gpu_request(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs or 'auto', got {text!r}") from None


def _name_value(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}") from None


def _settings(args: argparse.Namespace) -> Any:
    from .config import ServeSettings

    given = {k: getattr(args, k) for k in (
        "host", "port", "data_dir", "registry_url", "admin_key", "replicas", "ray_address",
        "adapter_store", "adapter_secrets_dir",
        "public_metrics", "ingress_replicas", "api_docs", "admin_port",
        "ignore_eos_tenants", "tool_call_parser",
    ) if getattr(args, k, None) is not None}
    return ServeSettings(**given)


def cmd_serve(args: argparse.Namespace) -> int:
    from lorafleet.adapters.keyfiles import WeakAdminKey, load_or_create_admin_key

    from .config import EngineConfig

    started = time.monotonic()
    settings = _settings(args)
    data_dir = Path(settings.data_dir).resolve()
    settings = settings.model_copy(update={"data_dir": data_dir})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(data_dir / "vllm-cache"))
    demo = args.demo if args.demo is not None else args.model_dir is None
    if args.model_dir is None and not demo:
        print("error: --no-demo needs --model-dir", file=sys.stderr)
        return 2
    # Settings are checked before anything slow is imported or built (vLLM, Ray, the model):
    # a mistake must fail in a second with one line.
    try:
        admin_key = load_or_create_admin_key(data_dir, settings.admin_key)
    except (WeakAdminKey, PermissionError) as e:
        raise SystemExit(f"lorafleet serve: error: {e}") from None
    if settings.tool_call_parser is not None:  # vLLM's parser registry: known only by importing it
        from .api.openai_routes import check_tool_parser

        try:
            check_tool_parser(settings.tool_call_parser)
        except ValueError as e:
            raise SystemExit(f"lorafleet serve: error: {e}") from None
    from . import deploy
    from .assemble import make_intake
    settings = settings.model_copy(update={"admin_key": admin_key})
    if demo and args.model_dir is None:
        from .demo import DEMO_MODEL_NAME
        from .demo.basemodel import prepare_base_model

        model_dir = prepare_base_model(data_dir / "models" / DEMO_MODEL_NAME)
        served = DEMO_MODEL_NAME
    else:
        model_dir = Path(args.model_dir).resolve()
        served = args.served_model_name or model_dir.name
    try:
        engine_config = EngineConfig.of(
            engine_settings(args), model_dir=str(model_dir), served_model_name=served)
    except ValidationError as e:
        raise SystemExit("lorafleet serve: error: " + "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
    keys: dict[str, str] = {}
    if demo:
        from lorafleet.adapters.registry import open_registry

        from .seed import seed_demo

        async def _seed() -> dict[str, str]:
            registry = open_registry(settings.registry())
            try:
                return await seed_demo(registry, make_intake(engine_config, data_dir), data_dir)
            finally:
                await registry.close()

        keys = asyncio.run(_seed())
    print(f"Starting LoRAFleet: model {served}, {settings.replicas} engine replica(s)...", flush=True)
    from .engine.errors import DeviceMismatch

    try:
        deploy.run(settings, engine_config, ray_temp_dir=Path("/tmp") / "lorafleet-ray")
    except DeviceMismatch as e:  # e.g. GPUs asked of a Ray that has none: say so, no traceback
        deploy.shutdown()
        raise SystemExit(f"lorafleet serve: error: {e}") from None
    base = f"http://{settings.host}:{settings.port}"
    _wait_healthy(base + "/health", timeout=600)
    admin_url = (f"http://{settings.host}:{settings.admin_port}"
                 if settings.admin_port is not None else None)
    _banner(base, served, keys, data_dir, time.monotonic() - started, admin_url)
    stop = {"now": False}

    def _stop(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        print("Shutting down...", flush=True)
        deploy.shutdown()
    return 0


def _wait_healthy(url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server did not become healthy at {url} within {timeout:.0f}s")


def _banner(base: str, served: str, keys: dict[str, str], data_dir: Path, took: float,
            admin_url: str | None = None) -> None:
    print(f"\nLoRAFleet is serving at {base}/v1 (ready in {took:.1f}s)")
    print(f"  base model: {served}")
    if keys:
        from .seed import DEMO_TENANTS

        for tenant, key in keys.items():
            adapters = ", ".join(DEMO_TENANTS.get(tenant, ("", ()))[1])
            print(f"  tenant {tenant:<6} key {key}   adapters: {adapters}")
    print(f"  admin key: in {data_dir / 'admin.key'}")
    if admin_url:
        print(f"  admin API: {admin_url}/admin/v1 only (admin commands: --url {admin_url})")
    if keys:
        tenant, key = next(iter(keys.items()))
        print(f"\nTry:\n  curl {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
              "-H 'Content-Type: application/json' \\\n"
              "    -d '{\"model\": \"french\", \"messages\": [{\"role\": \"user\", "
              "\"content\": \"What is the capital of Italy?\"}]}'")
    print("Press Ctrl-C to stop.\n", flush=True)


def cmd_keys(args: argparse.Namespace) -> int:
    from .seed import read_demo_keys

    data_dir = Path(args.data_dir or ".lorafleet")
    keys = read_demo_keys(data_dir)
    if not keys:
        print(f"No demo keys in {data_dir}; run `lorafleet serve` (or `make run`) first.", file=sys.stderr)
        return 1
    for tenant, key in keys.items():
        print(f"{tenant}\t{key}")
    admin = data_dir / "admin.key"
    if admin.exists():
        print(f"admin\t{admin.read_text().strip()}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .demo import DEMO_MODEL_NAME
    from .demo.basemodel import prepare_base_model

    data_dir = Path(args.data_dir or ".lorafleet").resolve()
    path = prepare_base_model(data_dir / "models" / DEMO_MODEL_NAME)
    print(path)
    return 0


# -- admin client ----------------------------------------------------------------------


def _admin_call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> int:
    import httpx

    key = args.admin_key or os.environ.get("LORAFLEET_ADMIN_KEY")
    if not key:
        key_file = Path(args.data_dir or ".lorafleet") / "admin.key"
        key = key_file.read_text().strip() if key_file.exists() else None
    if not key:
        print("error: no admin key (--admin-key, LORAFLEET_ADMIN_KEY or <data-dir>/admin.key)",
              file=sys.stderr)
        return 2
    try:
        r = httpx.request(method, args.url.rstrip("/") + path, json=body,
                          headers={"Authorization": f"Bearer {key}"}, timeout=300)
    except httpx.HTTPError as e:
        print(f"error: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    if r.status_code == 204:
        print("ok")
        return 0
    try:
        payload = r.json()
    except ValueError:
        payload = r.text
    if r.status_code >= 400:
        msg = payload.get("error", {}).get("message") if isinstance(payload, dict) else payload
        print(f"error ({r.status_code}): {msg}", file=sys.stderr)
        return 1
    print(json.dumps(payload, indent=2))
    return 0


def _admin_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, help="Server URL (default %(default)s).")
    common.add_argument("--admin-key", default=None, help="Admin credential.")
    common.add_argument("--data-dir", default=None, help="Where admin.key is (default .lorafleet).")

    t = sub.add_parser("tenant", help="Manage tenants.").add_subparsers(dest="op", required=True)
    p = t.add_parser("create", parents=[common], help="Create or update a tenant.")
    p.add_argument("name")
    p.add_argument("--display-name")
    p.add_argument("--max-concurrent", type=int)
    p.add_argument("--rpm", type=int, help="Requests per minute.")
    p.add_argument("--tpm", type=int, help="Tokens per minute.")
    p.set_defaults(func=lambda a: _admin_call(a, "POST", "/admin/v1/tenants", {
        "name": a.name, "display_name": a.display_name,
        "quota": {"max_concurrent": a.max_concurrent, "requests_per_minute": a.rpm,
                  "tokens_per_minute": a.tpm}}))
    p = t.add_parser("list", parents=[common], help="List tenants.")
    p.set_defaults(func=lambda a: _admin_call(a, "GET", "/admin/v1/tenants"))
    p = t.add_parser("delete", parents=[common], help="Delete a tenant, its keys and adapters.")
    p.add_argument("name")
    p.set_defaults(func=lambda a: _admin_call(a, "DELETE", f"/admin/v1/tenants/{a.name}"))

    k = sub.add_parser("key", help="Manage API keys.").add_subparsers(dest="op", required=True)
    p = k.add_parser("create", parents=[common], help="Create a key (shown once).")
    p.add_argument("tenant")
    p.set_defaults(func=lambda a: _admin_call(a, "POST", f"/admin/v1/tenants/{a.tenant}/keys", {}))
    p = k.add_parser("revoke", parents=[common], help="Revoke a key by its id.")
    p.add_argument("tenant")
    p.add_argument("key_id")
    p.set_defaults(func=lambda a: _admin_call(
        a, "DELETE", f"/admin/v1/tenants/{a.tenant}/keys/{a.key_id}"))

    d = sub.add_parser("adapter", help="Manage adapters.").add_subparsers(dest="op", required=True)
    p = d.add_parser("add", parents=[common], help="Fetch, validate, register and load an adapter.")
    p.add_argument("tenant")
    p.add_argument("name")
    p.add_argument("source", help="Path, file://, hf://, http(s):// or s3:// URI.")
    p.add_argument("--shared", action="store_true", help="Visible to every tenant.")
    p.add_argument("--no-load", action="store_true", help="Register only; load on first use.")
    p.set_defaults(func=lambda a: _admin_call(a, "POST", f"/admin/v1/tenants/{a.tenant}/adapters", {
        "name": a.name, "source": a.source, "shared": a.shared, "load": not a.no_load}))
    p = d.add_parser(
        "check", help="Check an adapter offline, as the server's intake would (no server).",
        description="Fetch and validate an adapter with the server's own intake code, in a "
        "worker process within the intake's time and memory bounds (LORAFLEET_INTAKE_*). "
        "Exit status: 0 valid, 1 refused, 3 the source could not be reached (a retry may "
        "help), 2 usage error.")
    p.add_argument("source", help="Path, file://, hf://, http(s):// or s3:// URI.")
    p.add_argument("--model-dir", required=True,
                   help="The served base model's directory (only its config.json is read).")
    p.add_argument("--served-model-name", default=None,
                   help="The base model's name on the server, which the adapter's "
                   "base_model_name_or_path must equal (default: the model directory's name).")
    p.add_argument("--max-rank", type=int, default=None,
                   help="Largest rank the server accepts (default: the engine's max_lora_rank "
                   "default).")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="Largest adapter the server accepts, in bytes (default: the server's "
                   "adapter_max_bytes default).")
    p.add_argument("--json", action="store_true", help="Print the verdict as one JSON object.")
    p.set_defaults(func=cmd_adapter_check)
    p = d.add_parser("list", parents=[common], help="List a tenant's adapters.")
    p.add_argument("tenant")
    p.set_defaults(func=lambda a: _admin_call(a, "GET", f"/admin/v1/tenants/{a.tenant}/adapters"))
    p = d.add_parser("delete", parents=[common], help="Unload everywhere and unregister.")
    p.add_argument("tenant")
    p.add_argument("name")
    p.set_defaults(func=lambda a: _admin_call(
        a, "DELETE", f"/admin/v1/tenants/{a.tenant}/adapters/{a.name}"))

    g = sub.add_parser("registry", help="The registry's identity: reset and rollback guard.")
    g = g.add_subparsers(dest="op", required=True)
    p = g.add_parser("status", parents=[common],
                     help="The registry identity the server trusts, and whether it refuses it.")
    p.set_defaults(func=lambda a: _admin_call(a, "GET", "/admin/v1/registry"))
    p = g.add_parser("accept-restore", parents=[common],
                     help="Accept the registry as it is now (restored from a backup, or emptied "
                     "on purpose); every ingress stops refusing it.")
    p.set_defaults(func=lambda a: _admin_call(a, "POST", "/admin/v1/registry/accept-restore"))


CHECK_VALID, CHECK_REFUSED, CHECK_UNREACHABLE = 0, 1, 3


def cmd_adapter_check(args: argparse.Namespace) -> int:
    """Judge one adapter as intake would: same worker, same code, same bounds, no server."""
    import shutil
    import tempfile

    from lorafleet.adapters.basemodel import load_base_model_info
    from lorafleet.adapters.errors import AdapterFetchError, AdapterValidationError
    from lorafleet.adapters.sandbox import IntakeSettings, check_adapter
    from lorafleet.adapters.validation import ValidationLimits

    from .config import EngineSettings, ServeSettings

    model_dir = Path(args.model_dir).expanduser().resolve()
    served = args.served_model_name or model_dir.name
    try:
        base = load_base_model_info(model_dir, served)
        settings = IntakeSettings()  # LORAFLEET_INTAKE_*, as the server reads them
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    limits = ValidationLimits(
        max_rank=args.max_rank or EngineSettings.model_fields["max_lora_rank"].default,
        max_bytes=args.max_bytes or ServeSettings.model_fields["adapter_max_bytes"].default)
    verdict: dict[str, Any]
    scratch = Path(tempfile.mkdtemp(prefix="lorafleet-check-"))
    try:
        _, manifest = check_adapter(args.source, scratch / "fetched", base=base, limits=limits,
                                    settings=settings)
        verdict = {"verdict": "valid", "rank": manifest.rank, "alpha": manifest.alpha,
                   "target_modules": list(manifest.target_modules),
                   "size_bytes": manifest.size_bytes, "digest": manifest.digest}
        status = CHECK_VALID
    except AdapterValidationError as e:
        verdict, status = {"verdict": "refused", "code": e.code, "reason": e.reason}, CHECK_REFUSED
    except AdapterFetchError as e:
        verdict = {"verdict": "refused", "code": "fetch_failed", "reason": e.reason,
                   "transient": e.transient}
        status = CHECK_UNREACHABLE if e.transient else CHECK_REFUSED
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(verdict))
    elif status == CHECK_VALID:
        print(f"valid: rank {verdict['rank']}, alpha {verdict['alpha']:g}, targets "
              f"{', '.join(verdict['target_modules'])}, {verdict['size_bytes']} bytes, "
              f"{verdict['digest']}")
    elif status == CHECK_UNREACHABLE:
        print(f"not checked, the source could not be fetched (a retry may help): "
              f"{verdict['reason']}")
    else:
        print(f"refused ({verdict['code']}): {verdict['reason']}")
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    p = sub.add_parser("keys", help="Show the demo tenants' API keys and the admin key again.")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_keys)
    p = sub.add_parser("prepare", help="Build the demo base model (SmolLM2-135M-Instruct) only.")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_prepare)
    _admin_parsers(sub)
    for module in ("lorafleet.loadtest.cli", "lorafleet.operator.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError as e:
            if module == "lorafleet.loadtest.cli":  # the serving image leaves it out
                _needs_extra(sub, ("loadtest", "bench"), "loadtest", e)
            continue
        mod.register(sub)
    return parser


def _needs_extra(sub: Any, commands: tuple[str, ...], extra: str, why: ImportError) -> None:
    """Commands whose optional dependencies are missing: they say which extra to install
    instead of argparse's "invalid choice"."""
    def refuse(_args: argparse.Namespace) -> int:
        print(f"error: needs the {extra!r} extra (pip install 'lorafleet[{extra}]'): {why}",
              file=sys.stderr)
        return 2

    for name in commands:
        p = sub.add_parser(name, help=f"(needs the {extra!r} extra)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=refuse)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
