"""Traced fallbacks: span tree, propagation, metrics, access log, overhead trailer (in-memory SDK)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from inference.v1 import inference_pb2 as pb
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.observe import metrics as gateway_metrics
from tests.conftest import RunningGateway, start_gateway, stop_gateway
from tests.routing_helpers import MESSAGES, MODAL_MODEL, chain_settings
from tests.upstreams import FakeOpenAI, Ok, Status

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


@pytest.fixture(scope="module")
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    gateway_metrics.reset()
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        pytest.skip("another test installed a tracer provider first")
    yield exporter, reader


@pytest_asyncio.fixture
async def fallback_chain(otel: Any) -> AsyncIterator[tuple[RunningGateway, FakeOpenAI, FakeOpenAI, Any]]:
    modal, vast = FakeOpenAI(models=[MODAL_MODEL]).start(), FakeOpenAI(models=[MODAL_MODEL]).start()
    modal.default, vast.default = Status(503), Ok(tokens=["a ", "b ", "c"])
    running = await start_gateway(chain_settings(modal, vast))
    otel[0].clear()
    yield running, modal, vast, otel
    await stop_gateway(running)
    modal.stop()
    vast.stop()


def by_name(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


@pytest.mark.parametrize("rpc", ["Chat", "ChatStream"])
async def test_fallback_span_tree(fallback_chain: Any, rpc: str) -> None:
    running, _modal, vast, (exporter, _) = fallback_chain
    metadata = (("traceparent", TRACEPARENT),)
    if rpc == "Chat":
        await running.stub.Chat(pb.ChatRequest(messages=MESSAGES, max_tokens=7, temperature=0.5), metadata=metadata)
    else:
        async for _ in running.stub.ChatStream(
            pb.ChatStreamRequest(messages=MESSAGES, max_tokens=7, temperature=0.5), metadata=metadata
        ):
            pass
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    assert server.name == f"inference.v1.InferenceService/{rpc}"
    # The caller's traceparent is the server span's parent.
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_SPAN_ID
    assert server.attributes["rpc.grpc.status_code"] == "OK" and server.attributes["gateway.served_by"] == "vastai"

    (route,) = by_name(spans, "route ")
    assert route.parent is not None and route.parent.span_id == server.context.span_id
    assert route.attributes["gateway.chain"] == ("modal", "vastai")
    assert route.attributes["gateway.served_by"] == "vastai" and route.attributes["gateway.fallbacks"] == 2
    events = [(e.name, dict(e.attributes or {})) for e in route.events]
    assert ("retry", {"provider": "modal", "reason": "PROVIDER_UNAVAILABLE"}) in [
        (n, {k: v for k, v in a.items() if k != "delay_s"}) for n, a in events
    ]
    assert ("fallback", {"provider": "modal", "reason": "PROVIDER_UNAVAILABLE"}) in events

    attempts = sorted(by_name(spans, "chat "), key=lambda s: s.start_time or 0)
    assert [s.attributes["gateway.provider"] for s in attempts] == ["modal", "modal", "vastai"]
    for span in attempts:
        assert span.kind is SpanKind.CLIENT and span.name == f"chat {MODAL_MODEL}"
        assert span.parent is not None and span.parent.span_id == route.context.span_id  # children, not siblings
        assert span.context.trace_id == server.context.trace_id
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.request.model"] == MODAL_MODEL
        assert span.attributes["gen_ai.request.max_tokens"] == 7
        assert span.attributes["gen_ai.request.temperature"] == pytest.approx(0.5)
        assert span.attributes["server.address"] == "127.0.0.1" and isinstance(span.attributes["server.port"], int)
    assert [s.attributes.get("error.type") for s in attempts[:2]] == ["PROVIDER_UNAVAILABLE"] * 2
    served = attempts[2].attributes
    assert served["gen_ai.provider.name"] == "vllm" and served["gen_ai.response.finish_reasons"] == ("stop",)
    assert served["gen_ai.usage.output_tokens"] == 3 and served["gen_ai.usage.input_tokens"] > 0
    assert served["gen_ai.response.id"] and "error.type" not in served
    if rpc == "ChatStream":
        assert served["gen_ai.response.time_to_first_chunk"] > 0

    # The upstream request carries the same trace, with the attempt span as parent.
    header = vast.chat_requests[-1].headers["traceparent"]
    assert header.split("-")[1] == TRACE_ID and header.split("-")[2] == f"{attempts[2].context.span_id:016x}"


async def test_metrics_are_recorded(fallback_chain: Any) -> None:
    running, _, _, (_, reader) = fallback_chain
    async for _ in running.stub.ChatStream(pb.ChatStreamRequest(messages=MESSAGES)):
        pass
    await running.stub.Chat(pb.ChatRequest(messages=MESSAGES))
    data = reader.get_metrics_data()
    points: dict[str, list[dict[str, Any]]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points.setdefault(m.name, []).extend(dict(p.attributes or {}) for p in m.data.data_points)
    assert {
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
        "gen_ai.client.operation.time_to_first_chunk",
        "gateway.overhead.duration",
        "gateway.provider.attempts",
        "gateway.rpc.calls",
        "gateway.active_streams",
    } <= set(points)
    assert {a["gen_ai.token.type"] for a in points["gen_ai.client.token.usage"]} == {"input", "output"}
    attempts = points["gateway.provider.attempts"]
    assert {"gateway.provider": "modal", "outcome": "error", "error.type": "PROVIDER_UNAVAILABLE"} in attempts
    assert {"gateway.provider": "vastai", "outcome": "ok"} in attempts


async def test_access_log_and_overhead_trailer(fallback_chain: Any, caplog: pytest.LogCaptureFixture) -> None:
    running, *_ = fallback_chain
    caplog.set_level(logging.INFO, logger="service.access")
    call = running.stub.Chat(pb.ChatRequest(messages=MESSAGES), metadata=(("traceparent", TRACEPARENT),))
    await call
    trailer = dict(await call.trailing_metadata())
    assert float(trailer["x-gateway-overhead-ms"]) >= 0
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access"]
    line = lines[-1]
    assert line["method"] == "Chat" and line["code"] == "OK" and line["provider"] == "vastai"
    assert line["attempts"] == 3 and line["completion_tokens"] == 3 and line["trace_id"] == TRACE_ID
    assert line["latency_ms"] >= line["overhead_ms"] >= 0 and len(line["span_id"]) == 16
    assert "hello there" not in caplog.text  # no message content in logs


async def test_failed_call_is_logged_with_its_status(fallback_chain: Any, caplog: pytest.LogCaptureFixture) -> None:
    running, *_ = fallback_chain
    caplog.set_level(logging.INFO, logger="service.access")
    with pytest.raises(grpc.aio.AioRpcError):
        await running.stub.Chat(pb.ChatRequest())
    line = json.loads([r for r in caplog.records if r.name == "service.access"][-1].getMessage())
    assert line["code"] == "INVALID_ARGUMENT" and line["provider"] == ""


async def test_content_is_logged_only_when_enabled(otel: Any, caplog: pytest.LogCaptureFixture) -> None:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    vast.default = Ok(tokens=["sec", "ret"])
    running = await start_gateway(chain_settings(vast=vast, log_content=True))
    caplog.set_level(logging.INFO, logger="service.access")
    try:
        await running.stub.Chat(pb.ChatRequest(messages=MESSAGES))
        async for _ in running.stub.ChatStream(pb.ChatStreamRequest(messages=MESSAGES)):
            pass
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access"]
        assert [line["response_text"] for line in lines[-2:]] == ["secret", "secret"]
        assert lines[-1]["request_messages"][-1] == {"role": pb.ROLE_USER, "content": "hello there"}
    finally:
        await stop_gateway(running)
        vast.stop()


async def test_access_log_names_the_tenant(otel: Any, caplog: pytest.LogCaptureFixture) -> None:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    running = await start_gateway(chain_settings(vast=vast, inference_api_keys="acme:tok-acme-0123456789abcdef"))
    caplog.set_level(logging.INFO, logger="service.access")
    try:
        auth = (("authorization", "Bearer tok-acme-0123456789abcdef"),)
        await running.stub.Chat(pb.ChatRequest(messages=MESSAGES), metadata=auth)
        line = json.loads([r for r in caplog.records if r.name == "service.access"][-1].getMessage())
        assert line["tenant"] == "acme" and line["code"] == "OK"
        assert "tok-acme" not in caplog.text
    finally:
        await stop_gateway(running)
        vast.stop()


async def test_the_wake_up_has_a_span_of_its_own(otel: Any) -> None:
    exporter, _ = otel
    modal, vast = FakeOpenAI(models=[MODAL_MODEL]).start(), FakeOpenAI(models=[MODAL_MODEL]).start()
    modal.cold_start(not_listening_s=0.5, unavailable_s=0.0)
    running = await start_gateway(chain_settings(modal, vast, health_check_timeout_s=0.3))
    try:
        exporter.clear()
        metadata = (("traceparent", TRACEPARENT),)
        await running.stub.Chat(pb.ChatRequest(messages=MESSAGES, max_tokens=4), metadata=metadata)
        waker = running.gateway.router.slots[0].waker
        assert waker is not None
        await asyncio.wait_for(asyncio.shield(waker), 10)
        spans = exporter.get_finished_spans()
        (wake,) = by_name(spans, "wake_up modal")
        (route,) = by_name(spans, "route ")
        # Started by the caller's call, but not part of it: its own trace, its own events.
        assert wake.context.trace_id != route.context.trace_id and wake.parent is None
        assert "provider_warm" in [e.name for e in wake.events]
        assert "provider_warm" not in [e.name for s in spans if s is not wake for e in s.events]
        assert ("wake_up", {"provider": "modal"}) in [(e.name, dict(e.attributes or {})) for e in route.events]
    finally:
        await stop_gateway(running)
        modal.stop()
        vast.stop()
