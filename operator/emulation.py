"""Run the real operator in-process against kmock's Kubernetes API emulator.

Boundary: a harness for component tests and the benchmark (`lorafleet.operator.bench`), not for
production. Needs the dev dependency `kmock` (imported lazily) and a source checkout (the CRDs
are read from `charts/lorafleet/crds`, their single source of truth).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import kopf
import yaml

from .handlers import Dependencies, make_registry, make_settings
from .serving_client import ServingClient
from .settings import OperatorConfig

__all__ = ["CRD_DIR", "NAMESPACE", "Cluster", "declare_resources", "load_crds", "run_operator",
           "secret_manifest"]

CRD_DIR = Path(__file__).resolve().parents[1] / "charts" / "lorafleet" / "crds"
NAMESPACE = "ns1"
# Namespaces the emulator has: NAMESPACE (bound to every tenant by the default test config,
# as an operator watching only its own namespace is) and two bound only to the tenant of their
# own name. The operator watches NAMESPACE unless told more: each watched namespace costs
# three more watch streams, and kmock's cost grows with its request log.
NAMESPACES = (NAMESPACE, "team-a", "team-b")


def load_crds(crd_dir: Path = CRD_DIR) -> dict[str, dict[str, Any]]:
    crds = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


def declare_resources(k8s: Any) -> None:
    """Discovery for what kopf watches; without it kopf silently never watches."""
    import kmock

    verbs = ["list", "watch", "get", "patch", "create", "delete", "update"]
    for kind, crd in load_crds().items():
        names = crd["spec"]["names"]
        res = f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}/{names['plural']}"
        k8s.resources[res] = kmock.ResourceInfo(
            kind=kind, singular=names["singular"], namespaced=True, verbs=verbs,
            shortnames=names.get("shortNames", []), subresources=["status"])
    k8s.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", singular="secret",
                                                     namespaced=True, verbs=verbs)
    k8s.resources["v1/events"] = kmock.ResourceInfo(kind="Event", singular="event",
                                                    namespaced=True, verbs=verbs)
    k8s.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", singular="namespace",
                                                        namespaced=False, verbs=verbs)
    k8s.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition",
        namespaced=False, verbs=verbs)
    for namespace in NAMESPACES:
        k8s.objects["v1/namespaces", None, namespace] = {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}


class Cluster:
    """The emulator plus helpers a test reads like kubectl."""

    def __init__(self, k8s: Any) -> None:
        self.k8s = k8s

    def _url(self, resource: str, name: str | None = None, namespace: str = NAMESPACE) -> str:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        return f"{prefix}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")

    async def apply(self, resource: str, body: dict[str, Any], namespace: str = NAMESPACE) -> None:
        body = {**body, "metadata": {**body["metadata"], "namespace": namespace,
                                     "generation": 1,
                                     "uid": f"{namespace}.{body['metadata']['name']}",
                                     "resourceVersion": "1",
                                     "creationTimestamp": "2026-11-25T00:00:00Z"}}
        resp = await self.k8s.post(self._url(resource, namespace=namespace), json=body)
        assert resp.status < 300, await resp.text()

    async def patch_spec(self, resource: str, name: str, spec: dict[str, Any],
                         generation: int, namespace: str = NAMESPACE) -> None:
        resp = await self.k8s.patch(self._url(resource, name, namespace),
                                    json={"spec": spec, "metadata": {"generation": generation}},
                                    headers={"Content-Type": "application/merge-patch+json"})
        assert resp.status < 300, await resp.text()

    async def delete(self, resource: str, name: str, namespace: str = NAMESPACE) -> None:
        resp = await self.k8s.delete(self._url(resource, name, namespace))
        assert resp.status < 300, await resp.text()

    def get(self, resource: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        try:
            obj = self.k8s.objects[resource, namespace, name]
        except KeyError:
            return None
        if obj.deleted:
            return None
        return json.loads(json.dumps(dict(obj.raw)))

    async def wait_for(self, predicate: Callable[[], bool | Awaitable[bool]],
                       timeout: float = 10.0, what: str = "condition",
                       interval: float = 0.05) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(interval)



def secret_manifest(name: str, key: str, data_key: str = "apiKey") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "type": "Opaque", "data": {data_key: base64.b64encode(key.encode()).decode()}}


async def _trim_request_log(k8s: Any, keep: int = 64) -> None:
    """Keep kmock's request log short (benchmarks only).

    kmock records every request for assertions and matches each new one by scanning that log,
    so its cost grows with the square of the request count; at 1,000 objects the emulator, not
    the operator, would be measured. This trims private lists: never use it in tests.
    """
    while True:
        await asyncio.sleep(0.2)
        for owner in (k8s, *getattr(k8s, "_payloads", ())):
            log = getattr(owner, "_requests", None)
            if isinstance(log, list) and len(log) > keep:
                del log[:-keep]


class _NotKopfs(Collection[asyncio.Task[Any]]):
    """The tasks kopf must not wait for when it stops.

    On shutdown kopf gives every task that appeared in the loop after it started 5 s to finish
    ("hung" tasks). Here the loop also holds the emulator's HTTP server, whose keep-alive
    connection handlers appear after kopf started, and the teardown task that is itself waiting
    for kopf: neither is kopf's, and counted as kopf's they would make every stop wait 5 s.
    """

    def __init__(self, existing: set[asyncio.Task[Any]]) -> None:
        self._tasks = set(existing)

    def add(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks.add(task)

    def __contains__(self, task: object) -> bool:
        if task in self._tasks:
            return True
        coro = task.get_coro() if isinstance(task, asyncio.Task) else None
        return getattr(coro, "__qualname__", "") == "RequestHandler.start"  # aiohttp's server

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)


@contextlib.asynccontextmanager
async def run_operator(client: ServingClient, tenant_store: Any, k8s: Any = None,
                       config: OperatorConfig | None = None,
                       trim_request_log: bool = False,
                       namespaces: tuple[str, ...] = (NAMESPACE,),
                       stop_grace_s: float | None = 1.0) -> AsyncIterator[Cluster]:
    """The emulator with our CRDs declared, and the real kopf operator running against it,
    watching `namespaces` (some of NAMESPACES).

    Pass a running emulator (`k8s`) to start another operator on the same objects (a restart).
    On exit the operator is stopped as on SIGTERM and, if it has not finished after
    `stop_grace_s`, cancelled; a test of graceful stopping passes kopf's own grace (``None``).
    """
    import kmock

    async with contextlib.AsyncExitStack() as stack:
        if k8s is None:
            k8s = await stack.enter_async_context(kmock.KubernetesEmulator())
            await stack.enter_async_context(kmock.Server(k8s))
            declare_resources(k8s)
        config = config or OperatorConfig(resync_seconds=0.5, tenant_resync_seconds=1.0,
                                          tenant_namespaces={NAMESPACE: ("*",)})
        deps = Dependencies(serving=client, tenants=tenant_store, config=config)

        def login(**_: Any) -> Any:
            return kopf.ConnectionInfo(server=str(k8s.url).rstrip("/"), insecure=True)

        settings = make_settings()
        settings.scanning.disabled = True
        settings.posting.enabled = False
        settings.watching.reconnect_backoff = 0.1
        settings.networking.request_timeout = 5
        stop = asyncio.Event()
        ready = asyncio.Event()
        not_kopfs = _NotKopfs(asyncio.all_tasks())
        operator_tasks = await kopf.spawn_tasks(
            registry=make_registry(deps, login=login), settings=settings,
            namespaces=list(namespaces), standalone=True, stop_flag=stop, ready_flag=ready)
        task = asyncio.create_task(kopf.run_tasks(operator_tasks, ignored=not_kopfs))
        trimmer = (asyncio.create_task(_trim_request_log(k8s)) if trim_request_log else None)
        try:
            await asyncio.wait_for(ready.wait(), 10)
            yield Cluster(k8s)
        finally:
            if trimmer is not None:
                trimmer.cancel()
            not_kopfs.add(asyncio.current_task())
            stop.set()
            # Handlers and timers in the middle of a run get kopf's 5 s grace on a graceful stop.
            # A test that is not about stopping does not need it, so after `stop_grace_s` the
            # operator is cancelled, which cancels them at once (as a killed pod would).
            done, _ = await asyncio.wait({task}, timeout=stop_grace_s)
            if not done and stop_grace_s is not None:
                task.cancel()
            # kopf cancels its timers on the way out; their CancelledError may surface here.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 15)
