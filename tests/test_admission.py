"""Admission control against running gateways: the concurrency limit (with and without a bounded
wait), streams holding slots, per-tenant limits (smooth RPM, TPM reserved then settled, a tenant's
max_concurrent) with RetryInfo and QuotaFailure; plus the buckets' arithmetic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inference.v1 import inference_pb2 as pb

import clients
from service.guard.limits import Grant, InProcessLimits, Refusal
from service.guard.policy import TenantPolicy
from service.guard.tokens import estimate_prompt_tokens
from service.providers.base import Usage
from tests.conftest import RunningGateway, make_settings, start_gateway, stop_gateway
from tests.fakes import CannedProvider, bearer
from tests.routing_helpers import MODAL_MODEL, chain_settings
from tests.upstreams import FakeOpenAI, Ok, Status

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
    reason, retry, _ = quota(exc)
    return reason, retry


def quota(exc: grpc.aio.AioRpcError) -> tuple[str, float, tuple[str, str]]:
    """(ErrorInfo reason, RetryInfo delay, (QuotaFailure subject, limit)) of a RESOURCE_EXHAUSTED status."""
    assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    status = rpc_status.from_call(exc)
    assert status is not None
    reason, retry, violation = "", None, ("", "")
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry = retry_info.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            (v,) = failure.violations
            violation = (v.subject, v.quota_id)
    assert retry is not None, "RESOURCE_EXHAUSTED must say when to retry"
    return reason, retry, violation


async def refused(call: Awaitable[Any]) -> tuple[str, float]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return exhausted(info.value)


async def refused_by(call: Awaitable[Any]) -> tuple[str, float, tuple[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return quota(info.value)


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


# ----------------------------------------------------------------------------- per-tenant limits


def tenants_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return str(path)


def tokens_left(running: RunningGateway, tenant: str) -> float:
    limits = running.gateway.security.limits
    assert isinstance(limits, InProcessLimits)
    left = limits.tokens_left(tenant)
    assert left is not None
    return left


def prompt_of(**fields: Any) -> int:
    return estimate_prompt_tokens(pb.ChatRequest(messages=HELLO, **fields))


async def test_rpm_refills_smoothly_and_names_the_limit(tmp_path: Path) -> None:
    """rpm = 60 allows 6 calls at once (a tenth of the minute), then one a second: never 60 at once."""
    policy = tenants_file(tmp_path, "[tenants.alpha]\nrpm = 60\n")
    settings = make_settings(inference_api_keys=TENANTS, tenants_file=policy)
    running = await start_gateway(settings, [CannedProvider()])
    try:
        for _ in range(6):
            await chat(running, ALPHA)
        reason, retry_s, violation = await refused_by(chat(running, ALPHA))
        assert reason == "RATE_LIMIT_RPM" and 0 < retry_s <= 1.0, "the next request refills within a second"
        assert violation == ("tenant:alpha", "rpm")
        async with clients.AsyncInferenceClient(running.target, api_key=ALPHA) as client:
            with pytest.raises(clients.RateLimitedError) as info:
                await client.chat("hello", timeout_s=5)
        assert "'alpha'" in info.value.message and "rpm: 60 requests per minute, 6 at once" in info.value.message
        assert (await chat(running, BETA)).message.content == "canned answer", "beta has no limit"
        await asyncio.sleep(retry_s)
        assert (await chat(running, ALPHA)).message.content == "canned answer"
    finally:
        await stop_gateway(running)


async def test_rpm_from_the_environment_is_per_tenant_and_smooth() -> None:
    running = await start_gateway(make_settings(inference_api_keys=TENANTS, rate_limit_rpm=30), [CannedProvider()])
    try:
        for _ in range(3):
            await chat(running, ALPHA)
        reason, retry_s = await refused(chat(running, ALPHA))
        assert reason == "RATE_LIMIT_RPM" and 1.5 < retry_s <= 2.0, "one request refills every 60/30 s"
        assert (await chat(running, BETA)).message.content == "canned answer"
    finally:
        await stop_gateway(running)


async def test_tpm_reserves_prompt_and_max_tokens_then_settles_on_usage() -> None:
    provider = CannedProvider(usage=Usage(10, 20))  # every answer costs 30 tokens
    running = await start_gateway(make_settings(inference_api_keys=TENANTS, rate_limit_tpm=100), [provider])
    try:
        for _ in range(3):
            await chat(running, ALPHA, max_tokens=20)
        assert tokens_left(running, "alpha") == pytest.approx(100 - 3 * 30, abs=1), "settled on reported usage"
        # A call reserves its prompt estimate plus max_tokens before it starts: that does not fit
        # in the 10 left, so it is refused before any upstream work, saying when it would fit.
        reserve = prompt_of(max_tokens=20) + 20
        reason, retry_s, violation = await refused_by(chat(running, ALPHA, max_tokens=20))
        assert reason == "RATE_LIMIT_TPM" and violation == ("tenant:alpha", "tpm")
        assert retry_s == pytest.approx((reserve - 10) / (100 / 60), abs=1)
        assert provider.calls == 3, "a refused call never reaches a provider"
        assert (await chat(running, BETA, max_tokens=20)).usage.total_tokens == 30, "beta has its own bucket"
        # Streams settle on their final usage as well.
        stream = running.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO, max_tokens=20), metadata=bearer(BETA))
        assert [m async for m in stream][-1].final.usage.total_tokens == 30
        assert tokens_left(running, "beta") == pytest.approx(100 - 2 * 30, abs=1)
    finally:
        await stop_gateway(running)


async def test_unreported_usage_is_charged_the_reservation() -> None:
    provider = CannedProvider(usage=Usage(0, 0))  # an upstream that never reports usage
    running = await start_gateway(make_settings(rate_limit_tpm=6000), [provider])
    try:
        await chat(running, max_tokens=100)
        assert tokens_left(running, "anonymous") == pytest.approx(6000 - prompt_of(max_tokens=100) - 100, abs=3)
    finally:
        await stop_gateway(running)


async def test_a_failed_call_is_charged_its_prompt() -> None:
    with FakeOpenAI(models=[MODAL_MODEL]) as vast:
        vast.default = Status(503)
        running = await start_gateway(chain_settings(vast=vast, rate_limit_tpm=6000, retry_max_retries=0))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await chat(running, max_tokens=100)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert tokens_left(running, "anonymous") == pytest.approx(6000 - prompt_of(max_tokens=100), abs=3)
            # A call refused before any provider saw it costs nothing.
            with pytest.raises(grpc.aio.AioRpcError):
                await chat(running, max_tokens=100, temperature=9)
            assert tokens_left(running, "anonymous") == pytest.approx(6000 - prompt_of(max_tokens=100), abs=6)
        finally:
            await stop_gateway(running)


async def test_a_cancelled_stream_is_charged_its_prompt_and_what_was_relayed() -> None:
    gate = asyncio.Event()
    provider = CannedProvider(gate=gate, deltas=("12345678", "never sent"))
    provider.pause_before_delta = 1
    running = await start_gateway(make_settings(rate_limit_tpm=6000), [provider])
    try:
        stream = running.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO, max_tokens=1000), timeout=10)
        assert (await stream.read()).delta.text == "12345678"
        stream.cancel()
        await until(lambda: running.gateway.in_flight() == 0)
        # 8 characters relayed = 2 tokens, plus the prompt; not the 1,000 reserved, not nothing.
        expected = 6000 - estimate_prompt_tokens(pb.ChatStreamRequest(messages=HELLO, max_tokens=1000)) - 2
        assert tokens_left(running, "anonymous") == pytest.approx(expected, abs=3)
    finally:
        gate.set()
        await stop_gateway(running)


@pytest.mark.parametrize("rpc", ["Chat", "ChatStream"])
async def test_short_deadlines_do_not_dodge_the_token_limit(rpc: str) -> None:
    """The regression: 20 calls with a 0.3 s deadline and max_tokens=1000 against TPM=1000 all
    reached the provider, because each cut-short call got its whole reservation back."""
    with FakeOpenAI(models=[MODAL_MODEL]) as vast:
        vast.default = Ok(n_tokens=500, delay_s_between_tokens=0.02)  # still generating at the deadline
        running = await start_gateway(chain_settings(vast=vast, rate_limit_tpm=1000))
        codes = []
        try:
            for _ in range(20):
                try:
                    if rpc == "Chat":
                        await running.stub.Chat(pb.ChatRequest(messages=HELLO, max_tokens=1000), timeout=0.3)
                    else:
                        request = pb.ChatStreamRequest(messages=HELLO, max_tokens=1000)
                        _ = [m async for m in running.stub.ChatStream(request, timeout=0.3)]
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
            await until(lambda: running.gateway.in_flight() == 0)
        finally:
            await stop_gateway(running)
        reached = len(vast.chat_requests)
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == reached
    assert reached <= 2, f"{reached} of 20 calls reached the provider"
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 18


async def test_a_tenants_max_concurrent_holds_for_unary_and_streams(tmp_path: Path) -> None:
    gate = asyncio.Event()
    provider = CannedProvider(gate=gate)
    policy = tenants_file(tmp_path, "[tenants.alpha]\nmax_concurrent = 1\n")
    running = await start_gateway(make_settings(inference_api_keys=TENANTS, tenants_file=policy), [provider])
    try:
        stream = running.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO), metadata=bearer(ALPHA), timeout=10)
        await until(lambda: provider.open_streams == 1)
        reason, retry_s, violation = await refused_by(chat(running, ALPHA))
        assert reason == "TENANT_CONCURRENCY_LIMIT" and retry_s > 0 and violation == ("tenant:alpha", "max_concurrent")
        second = running.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO), metadata=bearer(ALPHA), timeout=10)
        assert (await refused_by(second.read()))[0] == "TENANT_CONCURRENCY_LIMIT"
        beta = asyncio.ensure_future(chat(running, BETA))  # another tenant is not held back
        await until(lambda: provider.calls == 2)
        gate.set()
        assert (await beta).message.content == "canned answer"
        assert [m async for m in stream][-1].HasField("final")
        await until(lambda: running.gateway.in_flight() == 0)
        assert (await chat(running, ALPHA)).message.content == "canned answer", "the slot came back"
    finally:
        gate.set()
        await stop_gateway(running)


async def test_most_restrictive_limit_wins() -> None:
    provider = CannedProvider(usage=Usage(20, 20))
    running = await start_gateway(make_settings(rate_limit_rpm=600, rate_limit_tpm=100), [provider])
    try:
        await chat(running, max_tokens=60)
        reason, _ = await refused(chat(running, max_tokens=60))
        assert reason == "RATE_LIMIT_TPM", "RPM has room; TPM does not"
    finally:
        await stop_gateway(running)


async def test_without_auth_all_callers_share_the_anonymous_tenant() -> None:
    running = await start_gateway(make_settings(rate_limit_rpm=20), [CannedProvider()])
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
    running = await start_gateway(make_settings(max_concurrent_requests=1, rate_limit_rpm=20), [provider])
    try:
        held = asyncio.ensure_future(chat(running))
        await until(lambda: provider.calls == 1)
        for _ in range(3):
            assert (await refused(chat(running)))[0] == "CONCURRENCY_LIMIT"
        gate.set()
        await held
        await chat(running)  # the second request of the burst of 2: the refusals cost nothing
        assert (await refused(chat(running)))[0] == "RATE_LIMIT_RPM"
    finally:
        gate.set()
        await stop_gateway(running)


def test_bucket_arithmetic_with_a_fake_clock() -> None:
    now = [0.0]
    limits = InProcessLimits(clock=lambda: now[0])
    policy = TenantPolicy("t", rpm=60, burst=6, tpm=600, max_concurrent=0)
    grants = [limits.acquire_now(policy, 1) for _ in range(6)]
    assert all(isinstance(g, Grant) for g in grants)
    refusal = limits.acquire_now(policy, 1)
    assert refusal == Refusal("rpm", pytest.approx(1.0)), "a burst of 6, then one a second"
    now[0] += 1.0  # one request (and 10 tokens) refilled
    grant = limits.acquire_now(policy, 1)
    assert isinstance(grant, Grant) and grant.tokens == 1
    # Tokens: 600 - 6 + 10 refilled = 600 (full), - 1 reserved = 599; a 600-token answer to the
    # 1-token reservation takes 599 more: empty.
    limits.settle_now(grant, 600)
    assert limits.tokens_left("t") == pytest.approx(0)
    limits.settle_now(grants[0], 0)  # a call that consumed nothing gives its reservation back
    assert limits.tokens_left("t") == pytest.approx(1)
    limits.settle_now(grants[1], 21)  # one that consumed more than it reserved goes into debt
    assert limits.tokens_left("t") == pytest.approx(-19)
    now[0] += 1.0
    refusal = limits.acquire_now(policy, 100)
    assert refusal == Refusal("tpm", pytest.approx((100 - (-19 + 10)) / 10)), "TPM needs 10.9 s, RPM none"
    now[0] += 10.9
    assert isinstance(limits.acquire_now(policy, 100), Grant)
    assert isinstance(limits.acquire_now(TenantPolicy("other", tpm=600), 600), Grant), "tenants have their own"
    # A reload that lowers a limit keeps what was used, and raising it again refills nothing.
    assert isinstance(limits.acquire_now(TenantPolicy("r", tpm=600), 10), Grant)
    assert isinstance(limits.acquire_now(TenantPolicy("r", tpm=50), 0), Grant)
    assert limits.tokens_left("r") == 50
    assert isinstance(limits.acquire_now(TenantPolicy("r", tpm=600), 0), Grant)
    assert limits.tokens_left("r") == 50


async def test_the_store_interface_gives_everything_back_on_cancel() -> None:
    limits = InProcessLimits(clock=lambda: 0.0)
    policy = TenantPolicy("t", rpm=6, burst=1, tpm=100, max_concurrent=1)
    grant = await limits.acquire(policy, 100)
    assert isinstance(grant, Grant) and limits.open_calls("t") == 1
    assert await limits.acquire(policy, 1) == Refusal("max_concurrent", 1.0)
    await limits.cancel(grant)
    assert limits.open_calls("t") == 0 and limits.tokens_left("t") == 100
    again = await limits.acquire(policy, 100)
    assert isinstance(again, Grant), "the request and the tokens came back too"
