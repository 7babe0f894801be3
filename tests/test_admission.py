"""Admission control against running gateways: the concurrency limit (with and without a bounded
wait), streams holding slots, and per-tenant RPM/TPM token buckets; plus the buckets' arithmetic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inference.v1 import inference_pb2 as pb

import clients
from service.guard.admission import RateLimiter
from service.providers.base import Usage
from tests.conftest import RunningGateway, make_settings, start_gateway, stop_gateway
from tests.fakes import CannedProvider, bearer

HELLO = [pb.Message(role=pb.ROLE_USER, content="hello")]
ALPHA = "alpha-token-0123456789abcdef"
BETA = "beta-token-0123456789abcdef"
TENANTS = f"alpha:{ALPHA},beta:{BETA}"


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def exhausted(exc: grpc.aio.AioRpcError) -> tuple[str, float]:
    """(ErrorInfo reason, RetryInfo delay) of a RESOURCE_EXHAUSTED status."""
    assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    status = rpc_status.from_call(exc)
    assert status is not None
    reason, retry = "", None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry = retry_info.retry_delay.ToNanoseconds() / 1e9
    assert retry is not None, "RESOURCE_EXHAUSTED must say when to retry"
    return reason, retry


async def refused(call: Awaitable[Any]) -> tuple[str, float]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return exhausted(info.value)


def chat(running: RunningGateway, token: str | None = None, **fields: Any) -> Awaitable[pb.ChatResponse]:
    metadata = bearer(token) if token else ()
    return running.stub.Chat(pb.ChatRequest(messages=HELLO, **fields), metadata=metadata, timeout=10)


# ----------------------------------------------------------------------------- concurrency


async def test_third_concurrent_call_is_refused_with_retry_info() -> None:
    gate = asyncio.Event()
    provider = CannedProvider(gate=gate)
    running = await start_gateway(make_settings(max_concurrent_requests=2), [provider])
    try:
        held = [asyncio.ensure_future(chat(running)) for _ in range(2)]
        await until(lambda: provider.calls == 2)
        assert running.gateway.in_flight() == 2
        reason, retry_s = await refused(chat(running))
        assert reason == "CONCURRENCY_LIMIT" and retry_s > 0
        async with clients.AsyncInferenceClient(running.target) as client:
            with pytest.raises(clients.RateLimitedError) as info:
                await client.chat("hello", timeout_s=5)
        assert "MAX_CONCURRENT_REQUESTS=2" in info.value.message and info.value.retry_after_s == retry_s
        # Health and the admin RPC are not Chat: they are answered while the gateway is full.
        assert (await running.stub.Health(pb.HealthRequest(), timeout=5)).status == pb.SERVING_STATUS_SERVING
        assert (await running.stub.GetProviderStatus(pb.GetProviderStatusRequest(), timeout=5)).in_flight == 2
        gate.set()
        assert [r.message.content for r in await asyncio.gather(*held)] == ["canned answer"] * 2
        assert running.gateway.in_flight() == 0
    finally:
        gate.set()
        await stop_gateway(running)


async def test_admission_wait_serves_the_call_when_a_slot_frees() -> None:
    first_gate, later_gate = asyncio.Event(), asyncio.Event()
    provider = CannedProvider(gate=first_gate)
    running = await start_gateway(make_settings(max_concurrent_requests=1, admission_wait_s=5.0), [provider])
    try:
        first = asyncio.ensure_future(chat(running))
        await until(lambda: provider.calls == 1)
        provider.gate = later_gate
        waiting = asyncio.ensure_future(chat(running))
        await asyncio.sleep(0.2)
        assert not waiting.done() and provider.calls == 1, "the second call must wait, not run"
        first_gate.set()
        await first
        await until(lambda: provider.calls == 2)
        assert running.gateway.in_flight() == 1
        later_gate.set()
        assert (await waiting).message.content == "canned answer"
        assert running.gateway.in_flight() == 0
    finally:
        first_gate.set()
        later_gate.set()
        await stop_gateway(running)


async def test_admission_wait_is_bounded() -> None:
    gate = asyncio.Event()
    provider = CannedProvider(gate=gate)
    running = await start_gateway(make_settings(max_concurrent_requests=1, admission_wait_s=0.3), [provider])
    try:
        held = asyncio.ensure_future(chat(running))
        await until(lambda: provider.calls == 1)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await chat(running)
        waited = time.monotonic() - started
        assert exhausted(info.value)[0] == "CONCURRENCY_LIMIT"
        assert "ADMISSION_WAIT_S=0.3" in (info.value.details() or "")
        assert 0.25 <= waited < 3.0
        # A queued call whose caller gives up frees its place: nothing is leaked.
        with pytest.raises(grpc.aio.AioRpcError) as deadline:
            await running.stub.Chat(pb.ChatRequest(messages=HELLO), timeout=0.1)
        assert deadline.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        gate.set()
        await held
        await until(lambda: running.gateway.in_flight() == 0)
        assert (await chat(running)).message.content == "canned answer"
    finally:
        gate.set()
        await stop_gateway(running)


async def test_streams_hold_slots_until_they_end_or_are_cancelled() -> None:
    gate = asyncio.Event()
    provider = CannedProvider(gate=gate)
    running = await start_gateway(make_settings(max_concurrent_requests=2), [provider])
    try:
        streams = [running.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO), timeout=10) for _ in range(2)]
        await until(lambda: provider.open_streams == 2)
        assert running.gateway.in_flight() == 2
        await refused(chat(running))
        streams[0].cancel()
        await until(lambda: running.gateway.in_flight() == 1 and provider.open_streams == 1)
        gate.set()
        messages = [m async for m in streams[1]]
        assert messages[-1].final.usage.total_tokens == 8
        await until(lambda: running.gateway.in_flight() == 0)
        # Cancelling a stream mid-way, after text was received, releases its slot too.
        gate.clear()
        provider.pause_before_delta = 1
        stream = running.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO), timeout=10)
        assert (await stream.read()).delta.text == "canned "
        assert running.gateway.in_flight() == 1
        stream.cancel()
        await until(lambda: running.gateway.in_flight() == 0 and provider.open_streams == 0)
    finally:
        gate.set()
        await stop_gateway(running)


# ----------------------------------------------------------------------------- rate limits


async def test_rpm_limit_is_per_tenant() -> None:
    running = await start_gateway(make_settings(inference_api_keys=TENANTS, rate_limit_rpm=3), [CannedProvider()])
    try:
        for _ in range(3):
            await chat(running, ALPHA)
        reason, retry_s = await refused(chat(running, ALPHA))
        assert reason == "RATE_LIMIT_RPM"
        assert 15 < retry_s <= 20, "one request refills every 60/3 s"
        async with clients.AsyncInferenceClient(running.target, api_key=ALPHA) as client:
            with pytest.raises(clients.RateLimitedError) as info:
                await client.chat("hello", timeout_s=5)
        assert "'alpha'" in info.value.message and "RATE_LIMIT_RPM" in info.value.message
        assert (await chat(running, BETA)).message.content == "canned answer"
    finally:
        await stop_gateway(running)


async def test_tpm_reserves_max_tokens_and_settles_on_usage() -> None:
    provider = CannedProvider(usage=Usage(10, 20))  # every answer costs 30 tokens
    running = await start_gateway(make_settings(inference_api_keys=TENANTS, rate_limit_tpm=100), [provider])
    try:
        for _ in range(3):
            await chat(running, ALPHA, max_tokens=20)
        # 100 - 3 * 30 = 10 tokens left: a call that may generate 20 is refused up front...
        reason, retry_s = await refused(chat(running, ALPHA, max_tokens=20))
        assert reason == "RATE_LIMIT_TPM" and 0 < retry_s <= 60 * 10 / 100 + 0.1
        assert provider.calls == 3, "a refused call never reaches a provider"
        # ...one that fits is served, and streams are counted from their final usage.
        stream = running.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO, max_tokens=5), metadata=bearer(ALPHA))
        assert [m async for m in stream][-1].final.usage.total_tokens == 30
        await refused(chat(running, ALPHA, max_tokens=1))
        assert (await chat(running, BETA, max_tokens=20)).usage.total_tokens == 30
    finally:
        await stop_gateway(running)


async def test_most_restrictive_limit_wins() -> None:
    provider = CannedProvider(usage=Usage(20, 20))
    running = await start_gateway(make_settings(rate_limit_rpm=100, rate_limit_tpm=50), [provider])
    try:
        await chat(running, max_tokens=40)
        reason, _ = await refused(chat(running, max_tokens=40))
        assert reason == "RATE_LIMIT_TPM", "RPM has room; TPM does not"
    finally:
        await stop_gateway(running)


async def test_without_auth_all_callers_share_the_anonymous_tenant() -> None:
    running = await start_gateway(make_settings(rate_limit_rpm=2), [CannedProvider()])
    try:
        await chat(running)
        await chat(running, "any-token-is-ignored-when-auth-is-off")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await chat(running)
        assert "'anonymous'" in (info.value.details() or "")
    finally:
        await stop_gateway(running)


async def test_calls_refused_for_concurrency_are_not_charged() -> None:
    gate = asyncio.Event()
    provider = CannedProvider(gate=gate)
    running = await start_gateway(make_settings(max_concurrent_requests=1, rate_limit_rpm=2), [provider])
    try:
        held = asyncio.ensure_future(chat(running))
        await until(lambda: provider.calls == 1)
        for _ in range(3):
            assert (await refused(chat(running)))[0] == "CONCURRENCY_LIMIT"
        gate.set()
        await held
        await chat(running)  # the second request of the minute: the refusals cost nothing
        assert (await refused(chat(running)))[0] == "RATE_LIMIT_RPM"
    finally:
        gate.set()
        await stop_gateway(running)


def test_bucket_arithmetic_with_a_fake_clock() -> None:
    now = [0.0]
    limiter = RateLimiter(rpm=60, tpm=600, clock=lambda: now[0])
    assert limiter.reservation(10_000) == 600, "a reservation never exceeds a full bucket"
    for _ in range(60):
        assert limiter.admit("t", 1) is None
    refusal = limiter.admit("t", 1)
    assert refusal is not None and refusal.reason == "RATE_LIMIT_RPM" and refusal.retry_after_s == pytest.approx(1.0)
    now[0] += 1.0  # one request (and 10 tokens) refilled
    assert limiter.admit("t", 1) is None
    # Tokens: 600 - 60 reserved + 10 refilled - 1 reserved = 549; a 600-token answer to a 1-token
    # reservation takes 599 more and leaves the bucket 50 in debt.
    limiter.settle("t", reserved_tokens=1, used_tokens=600)
    refusal = limiter.admit("t", 100)
    assert refusal is not None and refusal.reason == "RATE_LIMIT_TPM", "TPM needs 15 s, RPM only 1 s"
    assert refusal.retry_after_s == pytest.approx((100 + 50) / 10)
    now[0] += refusal.retry_after_s
    assert limiter.admit("t", 100) is None
    assert limiter.admit("other", 600) is None, "tenants have their own buckets"
