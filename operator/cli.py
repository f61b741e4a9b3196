"""`lorafleet operator run`: the command-line entry point of the operator.

Boundary: argument parsing and wiring only (config -> clients -> kopf). The main CLI calls
`register(subparsers)`; the chosen subcommand's `func(args) -> int` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

__all__ = ["main", "register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `operator run ...` to the main CLI's subparsers."""
    parser = subparsers.add_parser("operator", help="the Kubernetes operator (LoRAAdapter, Tenant)")
    commands = parser.add_subparsers(dest="operator_command", required=True)
    run_parser = commands.add_parser("run", help="watch LoRAAdapter and Tenant resources")
    run_parser.add_argument("--namespace", "-n", action="append", default=None,
                            help="a namespace to watch (repeatable); default: all namespaces")
    run_parser.add_argument("--serving-url", default=None,
                            help="serving ingress base URL (env LORAFLEET_OPERATOR_SERVING_URL)")
    run_parser.add_argument("--admin-key-env", default="LORAFLEET_ADMIN_KEY", metavar="VAR",
                            help="environment variable holding the serving admin key")
    run_parser.add_argument("--registry", default=None, metavar="URL",
                            help="registry URL for tenant keys (env "
                                 "LORAFLEET_OPERATOR_REGISTRY_URL), e.g. redis://redis:6379/0")
    run_parser.add_argument("--resync-seconds", type=float, default=None,
                            help="how often each adapter re-checks its placement")
    run_parser.add_argument("--verbose", "-v", action="store_true")
    run_parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import logging

    import kopf

    from .handlers import Dependencies, make_registry, make_settings
    from .metrics import serve_metrics
    from .serving_client import ServingClient
    from .settings import OperatorConfig
    from .tenant_store import RegistryTenantStore

    overrides: dict[str, Any] = {}
    if args.serving_url:
        overrides["serving_url"] = args.serving_url
    if args.registry:
        overrides["registry_url"] = args.registry
    if args.namespace:
        overrides["namespaces"] = tuple(args.namespace)
    if args.resync_seconds:
        overrides["resync_seconds"] = args.resync_seconds
    admin_key = os.environ.get(args.admin_key_env)
    if admin_key:
        overrides["admin_key"] = admin_key
    config = OperatorConfig(**overrides)
    if not config.registry_url:
        print("lorafleet operator: a registry URL is required (--registry or "
              "LORAFLEET_OPERATOR_REGISTRY_URL)")
        return 2
    if not config.admin_key.get_secret_value():
        print(f"lorafleet operator: no admin key in ${args.admin_key_env}")
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main_async() -> None:
        serving = ServingClient(config.serving_url, config.admin_key.get_secret_value(),
                                timeout=config.request_timeout_seconds)
        assert config.registry_url is not None
        tenants = RegistryTenantStore.from_url(config.registry_url)
        deps = Dependencies(serving=serving, tenants=tenants, config=config)
        if config.metrics_port:
            serve_metrics(deps.phases, config.metrics_port)
        liveness = f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None
        try:
            await kopf.operator(registry=make_registry(deps), settings=make_settings(),
                                namespaces=list(config.namespaces),
                                clusterwide=not config.namespaces, standalone=True,
                                liveness_endpoint=liveness)
        finally:
            await serving.aclose()
            await tenants.close()

    asyncio.run(main_async())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m lorafleet.operator.cli operator run ...`)."""
    parser = argparse.ArgumentParser(prog="lorafleet")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
