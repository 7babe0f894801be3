"""Telemetry that tells the truth: overhead without waits, the wait trailer (on errors too), span
status by who failed, usage only when reported, server.port, the circuit-state gauge, and the
caller's baggage kept from the upstreams (in-memory SDK, real channels). Bounded labels are a
property test in test_fuzz.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from inference.v1 import inference_pb2 as pb
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.observe.telemetry import _split_endpoint
from service.providers.base import Usage
from tests.conftest import make_settings, start_gateway, stop_gateway
from tests.fakes import CannedProvider, bearer
from tests.otel_memory import install, snapshot
from tests.routing_helpers import MESSAGES, MODAL_MODEL, chain_settings
from tests.upstreams import FakeOpenAI, Ok, Status

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ALPHA = "alpha-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    installed = install()
    if installed is None:
        pytest.skip("another test installed a tracer provider first")
    yield installed


def trailers(metadata: Any) -> dict[str, float]:
    values = dict(metadata or ())
    return {k: float(values[k]) for k in ("x-gateway-overhead-ms", "x-gateway-wait-ms")}


def last_access(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    return dict(json.loads([r for r in caplog.records if r.name == "service.access"][-1].getMessage()))


# ----------------------------------------------------------------------------- overhead and waits


@pytest.mark.parametrize("rpc", ["Chat", "ChatStream"])
async def test_a_retry_after_wait_is_not_overhead(otel: Any, rpc: str, caplog: pytest.LogCaptureFixture) -> None:
    """A 400 ms Retry-After used to be reported as 401 ms of overhead."""
    caplog.set_level(logging.INFO, logger="service.access")
    with FakeOpenAI(models=[MODAL_MODEL]) as vast:
        vast.enqueue(Status(429, retry_after_s=0.4))
        running = await start_gateway(chain_settings(vast=vast))
        try:
            if rpc == "Chat":
                call = running.stub.Chat(pb.ChatRequest(messages=MESSAGES), timeout=10)
                await call
            else:
                call = running.stub.ChatStream(pb.ChatStreamRequest(messages=MESSAGES), timeout=10)
                _ = [m async for m in call]
            sent = trailers(await call.trailing_metadata())
        finally:
            await stop_gateway(running)
    line = last_access(caplog)
    assert line["code"] == "OK" and line["attempts"] == 2
    assert sent["x-gateway-wait-ms"] >= 400 and line["wait_ms"] >= 400
    assert sent["x-gateway-overhead-ms"] < 20 and line["overhead_ms"] < 20
    assert line["latency_ms"] >= 400


async def test_waits_and_overhead_are_sent_on_errors_too(otel: Any) -> None:
    with FakeOpenAI(models=[MODAL_MODEL]) as vast:
        vast.default = Status(503, retry_after_s=0.3)
        running = await start_gateway(chain_settings(vast=vast, retry_max_retries=1))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await running.stub.Chat(pb.ChatRequest(messages=MESSAGES), timeout=10)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            sent = trailers(failed.value.trailing_metadata())
            assert sent["x-gateway-wait-ms"] >= 300 and sent["x-gateway-overhead-ms"] < 20
            assert dict(failed.value.trailing_metadata() or ()).get("grpc-status-details-bin"), "details still sent"
            with pytest.raises(grpc.aio.AioRpcError) as invalid:  # refused before any provider: no wait
                await running.stub.Chat(pb.ChatRequest(), timeout=10)
            sent = trailers(invalid.value.trailing_metadata())
            assert sent["x-gateway-wait-ms"] == 0 and sent["x-gateway-overhead-ms"] < 20
        finally:
            await stop_gateway(running)


# ----------------------------------------------------------------------------- spans


async def test_server_span_status_is_error_only_when_the_server_failed(otel: Any) -> None:
    exporter, _ = otel
    with FakeOpenAI(models=[MODAL_MODEL]) as vast:
        vast.default = Status(503)
        keys = {"inference_api_keys": f"alpha:{ALPHA}", "admin_api_keys": f"ops:{ADMIN}"}
        running = await start_gateway(chain_settings(vast=vast, retry_max_retries=0, **keys))
        try:
            cases = {
                "INVALID_ARGUMENT": (pb.ChatRequest(), bearer(ALPHA)),
                "UNAUTHENTICATED": (pb.ChatRequest(messages=MESSAGES), bearer("wrong-token-0123456789")),
                "PERMISSION_DENIED": (pb.ChatRequest(messages=MESSAGES), bearer(ADMIN)),
                "UNAVAILABLE": (pb.ChatRequest(messages=MESSAGES), bearer(ALPHA)),
            }
            for expected, (request, metadata) in cases.items():
                exporter.clear()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await running.stub.Chat(request, metadata=metadata, timeout=10)
                code = info.value.code()
                assert code.name == expected
                (server,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
                assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == code.value[0]
                wanted = StatusCode.ERROR if expected == "UNAVAILABLE" else StatusCode.UNSET
                assert server.status.status_code is wanted, expected
                for route in [s for s in exporter.get_finished_spans() if s.name.startswith("route ")]:
                    assert route.status.status_code is wanted, f"route span of {expected}"
        finally:
            await stop_gateway(running)


async def test_usage_is_not_recorded_when_the_upstream_reports_none(
    otel: Any, caplog: pytest.LogCaptureFixture
) -> None:
    exporter, reader = otel
    caplog.set_level(logging.INFO, logger="service.access")
    running = await start_gateway(make_settings(), [CannedProvider("silent", usage=Usage(0, 0))])
    try:
        exporter.clear()
        before = snapshot(reader)
        await running.stub.Chat(pb.ChatRequest(messages=MESSAGES), timeout=10)
        _ = [m async for m in running.stub.ChatStream(pb.ChatStreamRequest(messages=MESSAGES), timeout=10)]
        after = snapshot(reader)
    finally:
        await stop_gateway(running)
    attempts = [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]
    assert len(attempts) == 2
    for span in attempts:
        assert span.attributes is not None and span.attributes["gen_ai.response.id"] == "canned-1"
        assert (
            "gen_ai.usage.input_tokens" not in span.attributes and "gen_ai.usage.output_tokens" not in span.attributes
        )
    silent = [k for k in after if k[0] == "gen_ai.client.token.usage" and ("gateway.provider", "silent") in k[1]]
    assert not silent, "no token usage series for an upstream that reported none"
    assert [k for k in after if k not in before and k[0] == "gen_ai.client.operation.duration"], "but the call counts"
    assert last_access(caplog)["usage_reported"] is False


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("https://api.anthropic.com", ("api.anthropic.com", 443)),
        ("https://user:secret@ws--app-serve.modal.run/v1", ("ws--app-serve.modal.run", 443)),
        ("http://10.0.0.5", ("10.0.0.5", 80)),
        ("http://[::1]:8000", ("::1", 8000)),
        ("http://127.0.0.1:9000/v1", ("127.0.0.1", 9000)),
    ],
)
def test_server_address_and_port(endpoint: str, expected: tuple[str, int]) -> None:
    assert _split_endpoint(endpoint) == expected


# ----------------------------------------------------------------------------- metrics


async def test_circuit_state_gauge_shows_every_state_from_startup(otel: Any) -> None:
    _, reader = otel
    with FakeOpenAI(models=[MODAL_MODEL]) as modal, FakeOpenAI(models=[MODAL_MODEL]) as vast:
        running = await start_gateway(chain_settings(modal, vast, circuit_failure_threshold=1, retry_max_retries=0))
        try:
            gauge = {
                (a["gateway.provider"], a["gateway.circuit.state"]): p.value
                for (n, attrs), p in snapshot(reader).items()
                if n == "gateway.provider.circuit_state"
                for a in [dict(attrs)]
            }
            for provider in ("modal", "vastai"):
                assert gauge[(provider, "closed")] == 1
                assert gauge[(provider, "open")] == 0 and gauge[(provider, "half_open")] == 0
            modal.default = Status(503)
            await running.stub.Chat(pb.ChatRequest(messages=MESSAGES), timeout=10)
            gauge = {
                dict(attrs)["gateway.circuit.state"]: p.value
                for (n, attrs), p in snapshot(reader).items()
                if n == "gateway.provider.circuit_state" and ("gateway.provider", "modal") in attrs
            }
            assert gauge == {"closed": 0, "open": 1, "half_open": 0}
        finally:
            await stop_gateway(running)


# ----------------------------------------------------------------------------- baggage


@pytest.mark.parametrize("forward", [False, True])
async def test_callers_baggage_reaches_upstreams_only_when_asked(otel: Any, forward: bool) -> None:
    with FakeOpenAI(models=[MODAL_MODEL]) as vast:
        vast.default = Ok(tokens=["x"])
        running = await start_gateway(chain_settings(vast=vast, forward_baggage=forward))
        try:
            metadata = (("traceparent", TRACEPARENT), ("baggage", "user.id=alice,team=research"))
            await running.stub.Chat(pb.ChatRequest(messages=MESSAGES), metadata=metadata, timeout=10)
        finally:
            await stop_gateway(running)
    headers = vast.chat_requests[-1].headers
    assert headers["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1], "the trace always goes on"
    if forward:
        assert "user.id=alice" in headers.get("baggage", "")
    else:
        assert "baggage" not in headers
