"""The proxy's arrival stamp: what starts TTFT, and why a client cannot forge it."""

from __future__ import annotations

import math

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from lorafleet.serving.api.arrival import (
    CALLBACK_ENV,
    MAX_QUEUE_S,
    RECEIVED_AT_HEADER,
    proxy_environment,
    proxy_middlewares,
    proxy_stamps_arrival,
    queued_seconds,
)
from lorafleet.serving.api.metering import RequestMeter
from lorafleet.serving.metrics import ServingMetrics


def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"stamps": request.headers.getlist(RECEIVED_AT_HEADER)})


def test_the_proxy_stamps_once_and_drops_a_forged_value() -> None:
    import time

    app = Starlette(routes=[Route("/", _echo)], middleware=proxy_middlewares())
    before = time.time()
    got = TestClient(app).get("/", headers={RECEIVED_AT_HEADER: "1.0"}).json()["stamps"]
    assert len(got) == 1 and before <= float(got[0]) <= time.time()


def test_queued_seconds_reads_only_credible_stamps() -> None:
    assert queued_seconds("100.0", 100.25) == 0.25
    assert queued_seconds(None, 100.0) == 0.0
    assert queued_seconds("not a number", 100.0) == 0.0
    assert queued_seconds("nan", 100.0) == 0.0
    assert queued_seconds("101.0", 100.0) == 0.0  # from the future: a skewed or forged clock
    assert queued_seconds("0", MAX_QUEUE_S + 1) == 0.0


def test_the_ingress_trusts_the_stamp_only_where_the_proxy_makes_it() -> None:
    assert proxy_stamps_arrival(proxy_environment())
    assert not proxy_stamps_arrival({})
    assert not proxy_stamps_arrival({CALLBACK_ENV: "somebody.else:callback"})


def test_ttft_ends_when_the_first_token_is_written_not_when_it_is_generated() -> None:
    meter = RequestMeter(ServingMetrics(), "alice", "base", arrival=10.0)
    meter.on_tokens(0, 1, now=10.5)
    assert meter.ttft() == 0.5  # a non-streaming answer: first token from the engine
    meter.on_written(10.75)
    meter.on_written(11.0)  # only the first write counts
    assert math.isclose(meter.ttft() or 0, 0.75)
