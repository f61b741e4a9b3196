"""The admin API client: answers become the operator's errors (and so kopf's retry policy)."""

from __future__ import annotations

import argparse
import json

import httpx
import pytest
from pydantic import ValidationError

from lorafleet.operator.cli import register
from lorafleet.operator.errors import (
    AdapterRejected,
    ServingUnavailable,
    TenantMissing,
)
from lorafleet.operator.serving_client import ServingClient
from lorafleet.operator.settings import OperatorConfig


def error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "x",
                                                  "param": None, "code": None}})


def client_for(handler) -> ServingClient:  # type: ignore[no-untyped-def]
    return ServingClient("http://serving", "k", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(("status", "exc"), [(422, AdapterRejected), (400, AdapterRejected),
                                             (503, ServingUnavailable),
                                             (429, ServingUnavailable)])
async def test_register_errors_map_to_retry_policy(status: int, exc: type) -> None:
    client = client_for(lambda request: error(status, "Adapter refused: pickle files"))
    with pytest.raises(exc) as info:
        await client.register_adapter("alice", "a", "/x")
    assert "Adapter refused" in info.value.message or status in (429, 503)
    await client.aclose()


async def test_register_on_unknown_tenant_is_tenant_missing() -> None:
    client = client_for(lambda request: error(404, "No tenant named `alice`."))
    with pytest.raises(TenantMissing):
        await client.register_adapter("alice", "a", "/x")
    await client.aclose()


async def test_unreachable_serving_is_transient() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = client_for(refuse)
    with pytest.raises(ServingUnavailable):
        await client.get_adapter("alice", "a")
    await client.aclose()


async def test_admin_key_is_sent_and_requests_follow_the_contract() -> None:
    seen: list[tuple[str, str, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k"
        seen.append((request.method, request.url.path,
                     json.loads(request.content) if request.content else {}))
        if request.url.path.endswith("/replicas"):
            return httpx.Response(200, json={"data": [{"replica_id": "r0", "adapters": []}]})
        if request.method == "DELETE":
            return error(404, "No adapter")
        if request.method == "GET":
            return error(404, "No adapter `a` in tenant `alice`.")
        return httpx.Response(201, json={"id": "alice/a@0123456789ab", "tenant": "alice",
                                         "name": "a", "source": "/x", "base_model": "b",
                                         "digest": "0123456789ab" * 5, "size_bytes": 3,
                                         "replicas": ["r0"]})

    client = client_for(handler)
    adapter = await client.register_adapter("alice", "a", "/x")
    assert adapter.adapter_id == "alice/a@0123456789ab" and adapter.replicas == ("r0",)
    assert await client.get_adapter("alice", "a") is None
    await client.delete_adapter("alice", "a")  # already gone is fine
    assert len(await client.list_replicas()) == 1
    assert seen[0] == ("POST", "/admin/v1/tenants/alice/adapters",
                       {"name": "a", "source": "/x", "load": False})
    # A LoRAAdapter's source.secretRef travels by name; serving resolves it on its own pods.
    await client.register_adapter("alice", "a", "s3://b/a", secret_ref="team-a")
    assert seen[-1][2] == {"name": "a", "source": "s3://b/a", "load": False,
                           "secret_ref": "team-a"}
    await client.aclose()


def test_config_forbids_unknown_settings() -> None:
    with pytest.raises(ValidationError):
        OperatorConfig(serving_ur="http://typo")  # type: ignore[call-arg]


def test_cli_registers_operator_run() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["operator", "run", "-n", "a", "-n", "b",
                              "--serving-url", "http://s:8000", "--admin-key-env", "KEY"])
    assert args.namespace == ["a", "b"] and args.admin_key_env == "KEY"
    assert callable(args.func)
