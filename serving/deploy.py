"""Ray Serve wiring: engine replicas behind an ingress, with adapter affinity.

Boundary: Ray only. The API app, engine and policies are built elsewhere and injected.

    HTTP (Ray Serve proxy) -> Ingress (FastAPI app from ``api.app.build_app``)
                                 -> RayEngineClient -> EngineReplica x N (``VLLMEngine`` each)

Adapter affinity is Ray Serve model multiplexing: a request for an adapter carries its
adapter id as ``multiplexed_model_id``; Serve routes it to a replica that already holds
that id when one exists, and each replica loads adapters through its multiplexed loader
(bounded by ``max_cpu_loras``, LRU). Control-plane calls (load everywhere, unload, stats,
metrics) fan out with ``DeploymentHandle.broadcast``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from .api.arrival import proxy_environment, proxy_stamps_arrival
from .config import EngineConfig, EngineSettings, ServeSettings, files_on_this_node
from .engine.errors import EngineDead
from .engine.protocol import AdapterRef, EngineStats, GenerateRequest, TokenDelta, merge_deltas
from .metrics import ReplicaHopMetrics
from .placement import (
    ReplicaResources,
    check_cluster_capacity,
    check_replica_devices,
    observe_devices,
    replica_resources,
)

log = logging.getLogger(__name__)
APP_NAME = "lorafleet"

STREAMING_ENVIRONMENT = {
    # Streamed items between deployments (replica -> ingress) and the proxy's calls to the
    # ingress go over direct gRPC streams instead of Ray object references: one message per
    # item instead of an object-store put, a report to the owner and a fetch.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # Each replica runs user code and its router on its own event loop: no hop between
    # threads (and the GIL handover it costs) per request and per streamed item.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
"""Ray Serve settings of the streaming path, for every Ray process (the gateway's cost per
token: docs/decisions/0024-gateway-overhead.md). Ray reads them at import: they must be in
the environment of the Ray nodes (``lorafleet serve`` sets them for the cluster it starts;
a value already set wins)."""


class _ResidentAdapter:
    """What the multiplexer caches per adapter; unloading it frees the engine's copy."""

    def __init__(self, engine: Any, adapter_id: str) -> None:
        self.engine = engine
        self.adapter_id = adapter_id

    async def __del__(self) -> None:  # called (and awaited) by Serve on LRU eviction
        from .engine.errors import AdapterBusy

        # Still in use: the engine's own LRU drops it once idle.
        with contextlib.suppress(AdapterBusy):
            await self.engine.unload_adapter(self.adapter_id)


async def coalesced(deltas: AsyncIterator[TokenDelta]) -> AsyncIterator[TokenDelta]:
    """Pass deltas on as they come, merging those that piled up while the consumer was busy.

    Every item crossing Ray costs a serialisation and an object transfer; when the ingress
    falls behind (a loaded CPU), several tokens travel as one item instead of queueing.
    Closing this generator cancels the pump, which aborts the engine request.
    """
    queue: asyncio.Queue[TokenDelta | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for d in deltas:
                queue.put_nowait(d)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # re-raised on the consumer's side
            queue.put_nowait(e)

    task = asyncio.create_task(pump())
    try:
        done = False
        while not done:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            ready: list[TokenDelta] = []
            for item in batch:
                if item is None:
                    done = True
                    break
                if isinstance(item, BaseException):
                    raise item
                ready.append(item)
            if ready:
                yield merge_deltas(ready)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def timed(deltas: AsyncIterator[TokenDelta], hops: Any, started: float
                ) -> AsyncIterator[TokenDelta]:
    """Pass deltas on, observing the engine's first-token time (from ``started``, wall
    clock) and the time between its outputs into ``hops`` (``ReplicaHopMetrics.hop``)."""
    last = started
    first = True
    async for delta in deltas:
        now = time.time()
        hops.labels("engine_first_token" if first else "engine_token").observe(now - last)
        first, last = False, now
        yield delta


ENGINE_WATCH_PERIOD_S = 0.5
ENGINE_DEATH_GRACE_S = 1.0


async def exit_when_engine_dies(engine: Any) -> None:
    """End this replica's process as soon as its engine dies.

    Ray Serve learns of a failing ``check_health`` only after three periods (30 s here) and
    then still waits to stop the replica; a replica process that exits is seen as crashed
    and replaced at once. The grace lets the requests in flight carry their error to the
    ingress first, so each client gets an OpenAI-shaped error rather than a dropped stream.
    """
    while engine.alive:
        await asyncio.sleep(ENGINE_WATCH_PERIOD_S)
    log.error("engine of replica %s died (engine processes %s); exiting so that Ray Serve "
              "replaces the replica", engine.replica_id, engine.engine_pids() or "in-process")
    await asyncio.sleep(ENGINE_DEATH_GRACE_S)
    os._exit(1)


def engine_options(
    config: EngineConfig, num_replicas: int, autoscaling: dict[str, Any] | None = None,
    *, resources: ReplicaResources | None = None,
) -> dict[str, Any]:
    """``serve.deployment`` options of the engine replicas: count and devices.

    The devices come from ``placement.replica_resources`` (the one place ``auto`` is decided)
    unless ``resources`` is given; tests build their stand-in deployments from this same
    function so that what they prove about placement holds for the engine.
    """
    resources = resources or replica_resources(config)
    return {
        "num_replicas": None if autoscaling else num_replicas,
        "autoscaling_config": autoscaling,
        **resources.deployment_options(),
    }


def engine_deployment(
    config: EngineConfig, num_replicas: int, autoscaling: dict[str, Any] | None = None,
    *, resources: ReplicaResources | None = None,
) -> Any:
    """The engine replica deployment class, parametrised by the engine's adapter capacity."""
    devices: ReplicaResources = resources or replica_resources(config)

    @serve.deployment(
        name="EngineReplica",
        max_ongoing_requests=max(8, config.max_num_seqs * 2),
        health_check_period_s=10,
        health_check_timeout_s=60,
        **engine_options(config, num_replicas, autoscaling, resources=devices),
    )
    class EngineReplica:
        """One vLLM engine behind Ray Serve, with adapters brought to its own node.

        Adapters arrive as ``AdapterRef`` (id + content: digest, source, secretRef, the shared
        store's copy), never as paths. The engine's ``AdapterFiles`` is a ``Materializer``
        rooted in ``adapter_files.data_dir`` *as seen on this replica's node* (each node has its
        own): a miss fetches by digest from the shared store, else the source, verifies and
        validates, caches, and pins the files while the adapter is resident.

        Which data directory: the node's own. ``application()`` hands every replica the
        builder's ``adapter_files`` (store, bounds, paths); a node whose environment sets
        ``LORAFLEET_DATA_DIR`` (and ``LORAFLEET_ADAPTER_SECRETS_DIR``) overrides the paths
        (``config.files_on_this_node``): the builder's directory is another machine's. On
        Kubernetes every pod has its own ``/data``; on one machine each raylet names its own.
        ``adapter_files`` unset: ``ServeSettings()`` of this node's environment.
        """

        async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
            self, engine_config: dict[str, Any], adapter_files: dict[str, Any] | None = None
        ) -> None:
            from .assemble import make_materializer
            from .config import AdapterFilesConfig
            from .engine.vllm_engine import VLLMEngine

            # Before vLLM: a replica without the devices it asked for says so, not hangs.

            self._devices = observe_devices()
            check_replica_devices(devices, self._devices)

            ctx = serve.get_replica_context()
            cfg = EngineConfig(**engine_config)
            files = files_on_this_node(AdapterFilesConfig(**adapter_files), os.environ) \
                if adapter_files is not None else ServeSettings().adapter_files()
            self._files = files
            self._materializer = make_materializer(cfg, files)
            self.engine = VLLMEngine(cfg, replica_id=ctx.replica_id.unique_id,
                                     adapter_files=self._materializer)
            # The multiplexer loads by id; this is what the id stands for (content, no path).
            self._refs: dict[str, AdapterRef] = {}
            self._hop_metrics = ReplicaHopMetrics()
            self._hops = self._hop_metrics.hop
            await self.engine.start()
            self._watchdog = asyncio.create_task(exit_when_engine_dies(self.engine))

        @serve.multiplexed(max_num_models_per_replica=config.max_cpu_loras)
        async def _adapter(self, adapter_id: str) -> _ResidentAdapter:
            await self.engine.load_adapter(self._refs[adapter_id])
            return _ResidentAdapter(self.engine, adapter_id)

        async def generate(self, request: GenerateRequest, dispatched_at: float | None = None
                           ) -> AsyncIterator[tuple[TokenDelta, float]]:
            """The request's deltas, each with the wall-clock time it left this replica (the
            ingress measures the stream's transit); ``dispatched_at``: when the ingress sent
            the call (wall clock), for the transit of the call itself."""
            started = time.time()
            if dispatched_at is not None:
                self._hops.labels("ingress_to_replica").observe(max(0.0, started - dispatched_at))
            if request.adapter is not None:
                self._refs[request.adapter.adapter_id] = request.adapter
                await self._adapter(request.adapter.adapter_id)
            async for delta in coalesced(timed(self.engine.generate(request), self._hops, started)):
                yield delta, time.time()

        async def load_adapter(self, adapter: AdapterRef) -> str:
            self._refs[adapter.adapter_id] = adapter
            await self._adapter(adapter.adapter_id)
            return self.engine.replica_id

        async def unload_adapter(self, adapter_id: str) -> bool:
            return await self.engine.unload_adapter(adapter_id)

        async def stats(self) -> EngineStats:
            return await self.engine.stats()

        async def placement(self) -> dict[str, Any]:
            """Where this replica runs: its node, the devices Ray gave it, its data directory,
            its processes (vLLM's engine core is a child) and its last adapter fetch's seconds."""
            import psutil
            import ray

            me = psutil.Process()
            return {
                "replica_id": self.engine.replica_id,
                "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": list(self._devices.ray_gpu_ids),
                "cuda_visible_devices": self._devices.cuda_visible_devices,
                "data_dir": self._files.data_dir,
                "pids": [me.pid, *(c.pid for c in me.children(recursive=True))],
                "last_fetch_seconds": self._materializer.last_fetch_seconds,
            }

        async def metrics_text(self) -> str:
            from .metrics import engine_metrics_text

            return engine_metrics_text(
                self.engine.replica_id,
                self.engine.core_metrics_text() + self._hop_metrics.exposition())

        async def check_health(self) -> None:
            await self.engine.llm.check_health()
            if self._watchdog.done():  # it only ends by exiting the process
                raise EngineDead("the engine watchdog stopped")

    return EngineReplica


class RayEngineClient:
    """``EngineClient`` over a Ray Serve handle to the engine replicas.

    ``observe_transit`` (seconds), when set, receives each delta's time from leaving the
    replica to arriving here (wall clocks of two processes, maybe two nodes)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle
        self.observe_transit: Callable[[float], None] | None = None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        model_id = request.adapter.adapter_id if request.adapter else ""
        stream = self.handle.options(stream=True, multiplexed_model_id=model_id).generate.remote(
            request, time.time()
        )
        done = False
        observe = self.observe_transit
        try:
            async for delta, sent_at in stream:
                if observe is not None:
                    observe(max(0.0, time.time() - sent_at))
                yield delta
            done = True
        except RayActorError as e:  # the replica's process itself died mid-request
            raise EngineDead(f"engine replica died: {type(e).__name__}") from e
        finally:
            if not done:
                stream.cancel()  # propagates to the replica, which aborts the vLLM request

    async def load_adapter(self, adapter: AdapterRef, replicas: int | None = None) -> list[str]:
        if replicas == 1:
            h = self.handle.options(multiplexed_model_id=adapter.adapter_id)
            return [await h.load_adapter.remote(adapter)]
        # Several replicas: Serve has no "N of M" call, so load everywhere.
        return list(await self.handle.broadcast("load_adapter", adapter).results_async())

    async def unload_adapter(self, adapter_id: str) -> None:
        await self.handle.broadcast("unload_adapter", adapter_id).results_async()

    async def replica_stats(self) -> list[EngineStats]:
        """Every replica Ray Serve routes to; one that cannot answer counts as unhealthy."""
        results = await self.handle.broadcast("stats").results_async(return_exceptions=True)
        stats = [
            r if isinstance(r, EngineStats)
            else EngineStats(replica_id=f"unreachable-{i}", resident_adapters=(), in_flight=0,
                             max_loras=0, max_cpu_loras=0, healthy=False)
            for i, r in enumerate(results)
        ]
        return sorted(stats, key=lambda s: s.replica_id)

    async def metrics_text(self) -> str:
        from .metrics import merge_expositions

        texts = await self.handle.broadcast("metrics_text").results_async()
        return merge_expositions(list(texts))


# Ray Serve caps a replica at 5 concurrent requests by default: far too few for an
# ingress that holds every streaming request open for its whole generation. No device and no
# placement constraint: an Ingress may land on any Ray node, so every node must hold the base
# model's files (tokenizer, config.json); the chart mounts the model volume on the head too.
# The replica count is set per application (``application``: ServeSettings.ingress_replicas).
@serve.deployment(
    name="Ingress", num_replicas=1, max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0}
)
@serve.ingress()
class Ingress:
    """The HTTP front: tenancy, validation, quotas and metrics, then the engine replicas."""

    def __init__(self, settings: dict[str, Any], engine_config: dict[str, Any], engines: Any) -> None:
        from .assemble import make_services

        s = ServeSettings(**settings)
        check_model_files(engine_config["model_dir"])
        client = RayEngineClient(engines)
        self.services = make_services(
            engine_config=EngineConfig(**engine_config),
            engines=client,
            registry_url=s.registry(),
            data_dir=Path(s.data_dir),
            admin_key=s.admin_key or "",
            max_body_bytes=s.max_body_bytes,
            top_k_adapters=s.metrics_top_adapters,
            adapter_max_bytes=s.adapter_max_bytes,
            adapter_cache_bytes=s.adapter_cache_bytes,
            metrics_key=s.metrics_key,
            public_metrics=s.public_metrics,
            adapter_store=s.adapter_store,
            adapter_secrets_dir=s.adapter_secrets_dir,
            api_docs=s.api_docs,
            admin_listener=s.admin_port is not None,
        )

        client.observe_transit = self.services.metrics.token_hop.labels(
            "replica_to_ingress").observe
        self.services.trust_arrival_stamp = proxy_stamps_arrival()
        self.services.request_policy = s.request_policy()
        if s.admin_port is not None:
            from .admin_listener import AdminListener

            # Ray Serve runs this constructor on the replica's user-code event loop, the one
            # that serves the ingress's requests: the listener runs there too.
            self.admin_listener = AdminListener(self.services, s.host, s.admin_port).start()

    def __serve_build_asgi_app__(self) -> Any:
        from .api.app import build_app

        return build_app(self.services)


def application(
    settings: ServeSettings, engine_config: EngineConfig, autoscaling: dict[str, Any] | None = None
) -> Any:
    """The Serve application graph: engine replicas bound into the ingress."""
    engines = engine_deployment(engine_config, settings.replicas, autoscaling).bind(
        engine_config.model_dump(), settings.adapter_files().model_dump()
    )
    # serve.deployment made the class a Deployment; mypy does not follow Ray (pyproject).
    ingress = Ingress.options(num_replicas=settings.ingress_replicas)  # type: ignore[attr-defined]
    return ingress.bind(settings.model_dump(mode="json"), engine_config.model_dump(), engines)


def check_model_files(model_dir: str) -> None:
    """Refuse to start an Ingress on a node without the base model's files, naming the node.

    Without this the tokenizer load fails with a Hugging Face "not a valid model identifier"
    error that hides the real cause: the model volume is not mounted on this Ray node.
    """
    if (Path(model_dir) / "config.json").is_file():
        return
    import socket

    raise FileNotFoundError(
        f"Ingress on node {socket.gethostname()}: no base model at {model_dir} (config.json "
        "missing). The Ingress reads the tokenizer there and may run on any Ray node: mount the "
        "model on every node (the chart mounts serving.model.volume on the head and the workers)")


class AppArgs(BaseModel):
    """Arguments of ``build_app``, the Serve application builder a RayService names.

    The engine settings are nested (``engine``: ``config.EngineSettings``, the same model the
    ``lorafleet serve`` flags come from, with the same defaults). They may also be given at the
    top level by their names (``{"max_loras": 8}``), the spelling of hand-written Serve configs
    and of the chart's ``rayService.appArgs``; a name given both ways is refused.
    """

    model_config = ConfigDict(extra="forbid")
    model_dir: str = Field(description="Base model directory inside the pods.")
    served_model_name: str = Field(description="Base model name in the API.")
    data_dir: str = Field(default="/data", description="Adapter cache and scratch space.")
    engine: EngineSettings = Field(
        default_factory=EngineSettings, description="The engine replicas' settings.")
    engine_num_replicas: int = Field(default=1, ge=1, description="Engine replicas.")
    ingress_num_replicas: int = Field(
        default=1, ge=1, description="Ingress replicas (Ray Serve spreads them over the nodes).")
    engine_autoscaling_config: dict[str, Any] | None = Field(
        default=None, description="Ray Serve autoscaling_config for the engine replicas."
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_engine_settings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in EngineSettings.model_fields if k in data}
        if not flat:
            return data
        nested = data.get("engine") or {}
        if isinstance(nested, EngineSettings):
            nested = nested.model_dump(exclude_unset=True)
        both = sorted(set(flat) & set(nested))
        if both:
            raise ValueError(f"engine setting(s) {both} given both at the top level and in engine")
        rest = {k: v for k, v in data.items() if k not in flat}
        return {**rest, "engine": {**nested, **flat}}

    def engine_config(self) -> EngineConfig:
        """The engine replicas' configuration these args describe (what the chart renders)."""
        return EngineConfig.of(
            self.engine, model_dir=self.model_dir, served_model_name=self.served_model_name)


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder (``import_path: lorafleet.serving.deploy:build_app``).

    The admin key and registry URL come from ``LORAFLEET_ADMIN_KEY`` and
    ``LORAFLEET_REGISTRY_URL`` (Kubernetes Secrets), never from the RayService object.
    """
    from lorafleet.adapters.keyfiles import load_or_create_admin_key

    a = AppArgs(**args)
    settings = ServeSettings(data_dir=Path(a.data_dir), replicas=a.engine_num_replicas,
                             ingress_replicas=a.ingress_num_replicas)
    settings = settings.model_copy(
        update={"admin_key": load_or_create_admin_key(Path(a.data_dir), settings.admin_key)}
    )
    return application(settings, a.engine_config(), a.engine_autoscaling_config)


def run(settings: ServeSettings, engine_config: EngineConfig, *, ray_temp_dir: Path | None = None) -> None:
    """Start (or attach to) Ray, deploy the app on ``settings.host:port`` and return."""
    import ray

    if not ray.is_initialized():
        if settings.ray_address:
            ray.init(address=settings.ray_address, namespace=APP_NAME)
        else:
            # Ray's processes inherit this environment: the proxy stamps arrivals, and the
            # streaming path takes Ray Serve's cheaper transport (STREAMING_ENVIRONMENT).
            os.environ.update(proxy_environment())
            for key, value in STREAMING_ENVIRONMENT.items():
                os.environ.setdefault(key, value)
            # "local": always a new cluster of our own; without it Ray joins any cluster that
            # `ray start` left on this machine (or RAY_ADDRESS names), someone else's included.
            ray.init(
                address="local",
                namespace=APP_NAME,
                include_dashboard=False,
                _temp_dir=str(ray_temp_dir) if ray_temp_dir else None,
                log_to_driver=True,
            )
    # A Ray we started cannot grow: refuse now what Serve would leave pending forever.
    check_cluster_capacity(
        replica_resources(engine_config), settings.replicas,
        ray.cluster_resources().get("GPU", 0.0), can_grow=bool(settings.ray_address))
    serve.start(http_options={"host": settings.host, "port": settings.port}, detached=False)
    serve.run(application(settings, engine_config), name=APP_NAME, route_prefix="/", blocking=False)


def shutdown() -> None:
    import ray

    try:
        serve.shutdown()
    finally:
        ray.shutdown()

