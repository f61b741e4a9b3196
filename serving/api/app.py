"""The FastAPI applications: the public one (OpenAI routes, /health, /metrics, and the admin
routes unless they have a listener of their own) and the admin one.

Boundary: wiring only. ``build_app(services)`` is what Ray Serve's ingress deployment
mounts and what the component tests drive in-process; ``build_admin_app(services)`` is what
the admin listener (``serving/admin_listener.py``) serves when ``services.admin_listener``.

The interactive docs and the OpenAPI document are off unless ``services.api_docs``: they list
every route and schema, the admin API's included, to anyone who asks.

While the public app runs (its ASGI lifespan, which Ray Serve's ingress runs too), a task on
its event loop measures the loop's lag (``sample_loop_lag``): every tenant's requests share
that loop, so its lag is what one tenant's CPU-heavy request costs all the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.registry.identity import RESET_MESSAGE, RegistryReset

from ..metrics import merge_expositions
from .admin_routes import build_admin_router
from .errors import ServiceUnavailable, install_error_handlers
from .openai_routes import build_openai_router
from .services import ApiServices
from .tenancy import registry_unavailable

LOOP_LAG_INTERVAL_S = 0.1
"""How often the loop-lag sampler asks to be woken: ten wake-ups a second cost nothing
measurable and catch any stall longer than a tenth of a second."""


async def sample_loop_lag(observe: Callable[[float], None],
                          interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
    """Forever: sleep ``interval_s`` on the running loop and ``observe`` how much later than
    that it woke (the time anything queued on the loop then waited). Cancel to stop."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - asked))


def _loop_lag_lifespan(services: ApiServices) -> Callable[[FastAPI], Any]:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(sample_loop_lag(services.metrics.loop_lag.observe))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan


def _new_app(services: ApiServices, title: str, lifespan: Callable[[FastAPI], Any] | None = None
             ) -> FastAPI:
    docs = bool(services.api_docs)
    app = FastAPI(
        lifespan=lifespan,
        title=title,
        version="0.1.0",
        description="Multi-tenant LoRA serving with an OpenAI-compatible API.",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)

    @app.exception_handler(RegistryUnavailable)
    async def _registry_down(_: Request, exc: RegistryUnavailable) -> JSONResponse:
        if isinstance(exc, RegistryReset):
            return ServiceUnavailable(RESET_MESSAGE).response()
        return registry_unavailable("The registry is unavailable; retry shortly.",
                                    services.tenancy_settings.retry_after_s).response()

    app.state.services = services
    return app


def build_admin_app(services: ApiServices) -> FastAPI:
    """The admin API alone, for a listener of its own."""
    app = _new_app(services, "LoRAFleet admin")
    app.include_router(build_admin_router(services))
    return app


def build_app(services: ApiServices) -> FastAPI:
    app = _new_app(services, "LoRAFleet", lifespan=_loop_lag_lifespan(services))
    app.include_router(build_openai_router(services))
    if not services.admin_listener:
        app.include_router(build_admin_router(services))

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

    return app
