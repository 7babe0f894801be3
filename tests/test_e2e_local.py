"""End to end against the real embedded llama.cpp server, in process: RPCs, health, client library.

The model is tiny and its answers are weak: these tests assert shape and protocol, never facts.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference.v1 import inference_pb2 as pb

from clients import AsyncInferenceClient, InferenceClient, InvalidRequestError
from tests.conftest import RunningGateway

pytestmark = pytest.mark.e2e

PROMPT = [
    pb.Message(role=pb.ROLE_SYSTEM, content="You are terse."),
    pb.Message(role=pb.ROLE_USER, content="Name a colour."),
]


async def test_chat_returns_text_usage_and_finish_reason(local_gateway: RunningGateway) -> None:
    r = await local_gateway.stub.Chat(pb.ChatRequest(messages=PROMPT, max_tokens=12), timeout=60)
    assert r.message.role == pb.ROLE_ASSISTANT and r.message.content.strip()
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert r.provider == "local" and r.model == "SmolLM2-135M-Instruct" and r.id
    assert [a.provider for a in r.attempts] == ["local"] and r.attempts[0].error_reason == ""


async def test_chat_stream_yields_deltas_then_one_final(local_gateway: RunningGateway) -> None:
    messages = [
        m async for m in local_gateway.stub.ChatStream(pb.ChatStreamRequest(messages=PROMPT, max_tokens=16), timeout=60)
    ]
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds.count("final") == 1 and kinds[-1] == "final"
    assert kinds.count("delta") >= 2
    final = messages[-1].final
    assert final.usage.completion_tokens >= kinds.count("delta") - 1 and final.usage.prompt_tokens > 0
    assert final.provider == "local" and final.finish_reason != pb.FINISH_REASON_UNSPECIFIED


async def test_max_tokens_is_respected(local_gateway: RunningGateway) -> None:
    r = await local_gateway.stub.Chat(pb.ChatRequest(messages=PROMPT, max_tokens=3, temperature=0.0), timeout=60)
    assert r.usage.completion_tokens <= 3


async def test_concurrent_streams_are_served_in_parallel(local_gateway: RunningGateway) -> None:
    async def one() -> tuple[str, float, float]:
        parts, first = [], 0.0
        request = pb.ChatStreamRequest(messages=PROMPT, max_tokens=24, temperature=0.0)
        async for m in local_gateway.stub.ChatStream(request, timeout=60):
            if m.HasField("delta"):
                first = first or time.monotonic()
                parts.append(m.delta.text)
        return "".join(parts), first, time.monotonic()

    results = await asyncio.gather(*(one() for _ in range(4)))
    assert all(text.strip() for text, _, _ in results)
    # In parallel, not one after another: every stream had its first token before any stream ended.
    assert max(first for _, first, _ in results) < min(end for _, _, end in results)


async def test_health_lists_the_local_provider(local_gateway: RunningGateway) -> None:
    h = await local_gateway.stub.Health(pb.HealthRequest(), timeout=10)
    assert h.status == pb.SERVING_STATUS_SERVING
    (p,) = h.providers
    assert (p.name, p.kind, p.state) == ("local", "llama.cpp", pb.PROVIDER_STATE_HEALTHY)
    assert p.endpoint.startswith("http://127.0.0.1:") and p.model == "SmolLM2-135M-Instruct"
    assert p.HasField("last_check_time") and p.HasField("last_latency") and p.circuit_state == pb.CIRCUIT_STATE_CLOSED


async def test_standard_health_service(local_gateway: RunningGateway) -> None:
    stub = health_pb2_grpc.HealthStub(local_gateway.channel)
    for service in ("", "inference.v1.InferenceService"):
        r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="inference.v1.InferenceService"), timeout=5)
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_bad_input_is_invalid_argument_naming_the_field(local_gateway: RunningGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await local_gateway.stub.Chat(pb.ChatRequest(messages=PROMPT, top_p=0.0), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "top_p" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in local_gateway.stub.ChatStream(pb.ChatStreamRequest(), timeout=10):
            pass
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "messages" in info.value.details()


async def test_async_client_library(local_gateway: RunningGateway) -> None:
    async with AsyncInferenceClient(local_gateway.target) as client:
        result = await client.chat("Name a colour.", system="You are terse.", max_tokens=8)
        assert result.text.strip() and result.usage.completion_tokens > 0 and result.provider == "local"
        async with client.chat_stream("Count to three.", max_tokens=12) as stream:
            deltas = [t async for t in stream]
        assert len(deltas) >= 2 and stream.final is not None and stream.usage is not None
        assert stream.final.text == "".join(deltas) and stream.usage.completion_tokens > 0
        health = await client.health()
        assert health.status == "SERVING" and health.providers[0].state == "HEALTHY"
        with pytest.raises(InvalidRequestError) as info:
            await client.chat("x", max_tokens=0)
        assert "max_tokens" in info.value.field_violations


async def test_leaving_a_stream_early_cancels_the_call(local_gateway: RunningGateway) -> None:
    async with AsyncInferenceClient(local_gateway.target) as client:
        async with client.chat_stream("Write a long story.", max_tokens=400) as stream:
            async for _ in stream:
                assert await llama_busy_slots(local_gateway) >= 1  # generating while we read
                break
        assert stream.final is None
    # Server side: the call ended (its admission slot is free) and llama.cpp stopped generating.
    deadline = time.monotonic() + 5
    while local_gateway.gateway.in_flight() or await llama_busy_slots(local_gateway):
        assert time.monotonic() < deadline, "the abandoned stream kept running on the server"
        await asyncio.sleep(0.05)
    async with AsyncInferenceClient(local_gateway.target) as client:
        # The server is still healthy and serving after the cancellation.
        assert (await client.chat("Hi", max_tokens=4)).text is not None


async def llama_busy_slots(running: RunningGateway) -> int:
    """Slots of the embedded llama.cpp server that are generating (its own /slots endpoint)."""
    endpoint = running.gateway.router.slots[0].provider.endpoint
    async with httpx.AsyncClient() as http:
        slots = (await http.get(f"{endpoint}/slots", timeout=5)).json()
    return sum(1 for s in slots if s.get("is_processing"))


async def test_sync_client_library(local_gateway: RunningGateway) -> None:
    def run() -> tuple[str, list[str], int]:
        with InferenceClient(local_gateway.target) as client:
            text = client.chat("Name a colour.", max_tokens=8).text
            with client.chat_stream("Count to three.", max_tokens=10) as stream:
                parts = list(stream)
            assert stream.usage is not None
            return text, parts, stream.usage.completion_tokens

    text, parts, tokens = await asyncio.to_thread(run)
    assert text.strip() and len(parts) >= 2 and tokens > 0
