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
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import RunningGateway, start_gateway, stop_gateway
from tests.otel_memory import delta, install, snapshot, unit
from tests.routing_helpers import MESSAGES, MODAL_MODEL, chain_settings
from tests.upstreams import FakeOpenAI, Ok, Status

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


@pytest.fixture(scope="module")
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    installed = install()
    if installed is None:
        pytest.skip("another test installed a tracer provider first")
    yield installed


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
    assert server.attributes["rpc.grpc.status_code"] == 0 and server.attributes["gateway.served_by"] == "vastai"
    assert server.status.status_code is StatusCode.UNSET

    (route,) = by_name(spans, "route ")
    assert route.parent is not None and route.parent.span_id == server.context.span_id
    assert route.attributes["gateway.chain"] == ("modal", "vastai")
    # Three attempts (modal, modal again, vastai): one change of provider, the retry is not one.
    assert route.attributes["gateway.served_by"] == "vastai" and route.attributes["gateway.fallbacks"] == 1
    assert route.attributes["gateway.attempts"] == 3
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
        assert span.attributes["gen_ai.operation.name"] == "chat" and span.attributes["gen_ai.provider.name"] == "vllm"
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
    before = snapshot(reader)
    async for _ in running.stub.ChatStream(pb.ChatStreamRequest(messages=MESSAGES)):
        pass
    await running.stub.Chat(pb.ChatRequest(messages=MESSAGES))
    after = snapshot(reader)

    def changed(name: str, **attrs: Any) -> Any:
        return delta(before, after, name, **attrs)

    # Each call: modal refused twice (first try and one retry), then vastai served it.
    vllm = {"gen_ai.provider.name": "vllm"}
    modal_error = {"gateway.provider": "modal", "outcome": "error", "error.type": "PROVIDER_UNAVAILABLE", **vllm}
    assert changed("gateway.provider.attempts", **modal_error).value == 4
    assert changed("gateway.provider.attempts", **{"gateway.provider": "vastai", "outcome": "ok", **vllm}).value == 2
    assert changed("gateway.fallbacks", **{"gateway.provider": "modal", "gateway.fallback.to": "vastai"}).value == 2
    served = {
        "gen_ai.operation.name": "chat",
        "gateway.provider": "vastai",
        "gen_ai.request.model": MODAL_MODEL,
        **vllm,
    }
    output = changed("gen_ai.client.token.usage", **served, **{"gen_ai.token.type": "output"})
    assert (output.count, output.value) == (2, 6), "three tokens per answer, as the upstream reported"
    prompt = changed("gen_ai.client.token.usage", **served, **{"gen_ai.token.type": "input"})
    assert prompt.count == 2 and prompt.value > 0
    duration = changed("gen_ai.client.operation.duration", **served)
    assert duration.count == 2 and 0 < duration.value < 10
    failed = changed(
        "gen_ai.client.operation.duration",
        **{**served, "gateway.provider": "modal"},
        **{"error.type": "PROVIDER_UNAVAILABLE"},
    )
    assert failed.count == 4
    assert changed("gen_ai.client.operation.time_to_first_chunk", **served).count == 2
    for method in ("Chat", "ChatStream"):
        calls = {"rpc.method": method, "rpc.grpc.status_code": 0, "gateway.tenant": "anonymous"}
        assert changed("gateway.rpc.calls", **calls).value == 1
        overhead = changed("gateway.overhead.duration", **{"rpc.method": method})
        assert overhead.count == 1 and 0 <= overhead.value < 0.5
    assert after[("gateway.active_streams", frozenset())].value == 0, "the stream ended"
    assert unit(after, "gen_ai.client.token.usage") == "{token}"
    for name in ("gen_ai.client.operation.duration", "gen_ai.client.operation.time_to_first_chunk"):
        assert unit(after, name) == "s"
    assert unit(after, "gateway.overhead.duration") == "s" and unit(after, "gateway.provider.attempts") == "{attempt}"


async def test_access_log_and_overhead_trailer(fallback_chain: Any, caplog: pytest.LogCaptureFixture) -> None:
    running, *_ = fallback_chain
    caplog.set_level(logging.INFO, logger="service.access")
    call = running.stub.Chat(pb.ChatRequest(messages=MESSAGES), metadata=(("traceparent", TRACEPARENT),))
    await call
    trailer = dict(await call.trailing_metadata())
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access"]
    line = lines[-1]
    assert line["method"] == "Chat" and line["code"] == "OK" and line["provider"] == "vastai"
    assert line["attempts"] == 3 and line["completion_tokens"] == 3 and line["trace_id"] == TRACE_ID
    assert line["usage_reported"] is True and len(line["span_id"]) == 16
    # The call's time is upstream + waits (the retry's backoff) + overhead, and nothing is counted twice.
    parts = line["upstream_ms"] + line["wait_ms"] + line["overhead_ms"]
    assert line["upstream_ms"] > 0 and line["wait_ms"] >= 0
    assert abs(line["latency_ms"] - parts) < 0.01 or line["overhead_ms"] == 0
    # The gateway's own work on a loopback call is a millisecond or two; a wait or an upstream
    # counted as overhead would take it well past this bound.
    assert 0 <= float(trailer["x-gateway-overhead-ms"]) < 50 and line["overhead_ms"] < 50
    assert float(trailer["x-gateway-wait-ms"]) == pytest.approx(line["wait_ms"], abs=0.01)
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
    modal.cold_start(not_listening_s=3.0, unavailable_s=0.0)  # outlasts a slow start-up under load
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
