"""The FastAPI application: OpenAI routes, admin routes, /health and /metrics.

Boundary: wiring only. ``build_app(services)`` is what Ray Serve's ingress deployment
mounts and what the component tests drive in-process.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.registry.identity import RESET_MESSAGE, RegistryReset

from ..metrics import merge_expositions
from .admin_routes import build_admin_router
from .errors import ServiceUnavailable, install_error_handlers
from .openai_routes import build_openai_router
from .services import ApiServices


def build_app(services: ApiServices) -> FastAPI:
    app = FastAPI(
        title="LoRAFleet",
        version="0.1.0",
        description="Multi-tenant LoRA serving with an OpenAI-compatible API.",
    )
    install_error_handlers(app)
    app.include_router(build_openai_router(services))
    app.include_router(build_admin_router(services))

    @app.exception_handler(RegistryUnavailable)
    async def _registry_down(_: Request, exc: RegistryUnavailable) -> JSONResponse:
        if isinstance(exc, RegistryReset):
            return ServiceUnavailable(RESET_MESSAGE).response()
        return ServiceUnavailable("The registry is unavailable; retry shortly.").response()

    @app.get("/health")
    async def health() -> dict[str, object]:
        # A replica whose engine died still answers until Ray Serve replaces it: not counted.
        stats = await services.engines.replica_stats()
        alive = sum(s.healthy for s in stats)
        return {"status": "ok", "model": services.served_model_name, "replicas": alive,
                "unhealthy_replicas": len(stats) - alive}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        services.check_metrics(request.headers.get("authorization"))
        for s in await services.engines.replica_stats():
            services.metrics.adapters_resident.labels(s.replica_id).set(len(s.resident_adapters))
        text = merge_expositions(
            [services.metrics.exposition().decode(), await services.engines.metrics_text()]
        )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.state.services = services
    return app
