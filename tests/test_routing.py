"""The fault matrix: upstream faults x {Chat, ChatStream} through a real gateway and real HTTP fakes.

Chain: modal (FakeOpenAI) -> vastai (FakeOpenAI) -> anthropic (FakeAnthropic, real SDK). Each case
asserts who served the call (or the exact status and details) and that no token was lost or
duplicated: the caller's text is exactly the serving upstream's text.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from inference.v1 import inference_pb2 as pb

from tests.conftest import start_gateway, stop_gateway
from tests.routing_helpers import MODAL_MODEL, call, chain_settings
from tests.upstreams import (
    ContextTooLong,
    EndWithoutFinish,
    FakeAnthropic,
    FakeOpenAI,
    InBandError,
    MalformedSSE,
    Ok,
    Overloaded,
    ResetAfter,
    ResetBeforeResponse,
    StallAfter,
    StallBeforeFirstToken,
    Status,
    UnknownModel,
)

RPCS = ["Chat", "ChatStream"]
MODAL_TOKENS = ["m1 ", "m2 ", "m3"]
VAST_TOKENS = ["v1 ", "v2 ", "v3"]
ANTH_TOKENS = ["a1 ", "a2"]


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]]:
    modal, vast, anth = FakeOpenAI(models=[MODAL_MODEL]), FakeOpenAI(models=[MODAL_MODEL]), FakeAnthropic()
    for srv in (modal, vast, anth):
        srv.start()
    yield modal, vast, anth
    for srv in (modal, vast, anth):
        srv.stop()


@pytest_asyncio.fixture
async def chain(fakes: tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]) -> AsyncIterator[tuple[Any, ...]]:
    modal, vast, anth = fakes
    for srv in fakes:
        srv.reset()
        if not srv.listening:
            srv.start_listening()
    modal.default, vast.default, anth.default = Ok(tokens=MODAL_TOKENS), Ok(tokens=VAST_TOKENS), Ok(tokens=ANTH_TOKENS)
    running = await start_gateway(chain_settings(modal, vast, anth))
    yield running, modal, vast, anth
    await stop_gateway(running)
    for srv in fakes:
        assert srv.errors == [], srv.errors


def served_by(outcome: Any, provider: str, tokens: list[str]) -> None:
    assert outcome.code is grpc.StatusCode.OK, (outcome.code, outcome.details)
    assert outcome.provider == provider
    assert outcome.text == "".join(tokens)  # nothing lost, nothing duplicated, nothing spliced
    assert outcome.attempts[-1] == (provider, "")
    if outcome.deltas:
        # Tokens arriving in one read may be relayed as one delta; the text is what must match.
        assert "".join(outcome.deltas) == "".join(tokens) and outcome.finals == 1


# (name, modal's persistent behaviour, modal chat requests for (Chat, ChatStream), modal's error reason)
FALLBACK_CASES = [
    ("500", Status(500), (2, 2), "PROVIDER_UNAVAILABLE"),
    ("502", Status(502), (2, 2), "PROVIDER_UNAVAILABLE"),
    ("503", Status(503), (2, 2), "PROVIDER_UNAVAILABLE"),
    ("429 short Retry-After", Status(429, retry_after_s=0.4), (2, 2), "PROVIDER_UNAVAILABLE"),
    ("429 long Retry-After", Status(429, retry_after_s=30), (1, 1), "PROVIDER_UNAVAILABLE"),
    ("reset before response", ResetBeforeResponse(), (2, 2), "PROVIDER_UNAVAILABLE"),
    ("stall before first token", StallBeforeFirstToken(5.0), (1, 1), "PROVIDER_TIMEOUT"),
    ("malformed", MalformedSSE(0), (1, 1), "PROVIDER_PROTOCOL_ERROR"),
    # vLLM's in-band error: an error chunk in a 200 stream (both RPCs stream upstream; not retried).
    ("in-band error", InBandError(0), (1, 1), None),
    ("end without finish", EndWithoutFinish(0), (1, 1), "PROVIDER_PROTOCOL_ERROR"),
    ("unknown model", UnknownModel(), (1, 1), "PROVIDER_MODEL_NOT_FOUND"),
]


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    ("name", "behaviour", "modal_requests", "reason"), FALLBACK_CASES, ids=[c[0] for c in FALLBACK_CASES]
)
async def test_failure_before_first_token_falls_back(
    chain: tuple[Any, ...], rpc: str, name: str, behaviour: Any, modal_requests: tuple[int, int], reason: str | None
) -> None:
    running, modal, vast, _ = chain
    modal.default = behaviour
    outcome = await call(running.stub, rpc)
    served_by(outcome, "vastai", VAST_TOKENS)
    expected = modal_requests[RPCS.index(rpc)]
    assert len(modal.chat_requests) == expected
    assert [p for p, _ in outcome.attempts] == ["modal"] * expected + ["vastai"]
    if reason is not None:
        assert all(r == reason for p, r in outcome.attempts if p == "modal")
    assert len(vast.chat_requests) == 1
    if isinstance(behaviour, Status) and behaviour.retry_after_s and expected == 2:
        # The retry waited for the upstream's Retry-After, not the (much shorter) backoff.
        first, second = modal.chat_requests
        assert second.received_at - first.received_at >= behaviour.retry_after_s * 0.95


async def test_refused_connections_fall_back(chain: tuple[Any, ...]) -> None:
    running, modal, _vast, _ = chain
    modal.stop_listening()
    for rpc in RPCS:
        outcome = await call(running.stub, rpc)
        served_by(outcome, "vastai", VAST_TOKENS)
        assert outcome.attempts[0] == ("modal", "PROVIDER_UNAVAILABLE")


MID_STREAM_CASES = [
    ("reset", ResetAfter(2), "PROVIDER_UNAVAILABLE"),
    ("stall", StallAfter(2, 5.0), "PROVIDER_TIMEOUT"),
    ("in-band error", InBandError(2), "PROVIDER_PROTOCOL_ERROR"),
    ("malformed", MalformedSSE(2), "PROVIDER_PROTOCOL_ERROR"),
    ("end without finish", EndWithoutFinish(2), "PROVIDER_PROTOCOL_ERROR"),
]


@pytest.mark.parametrize(("name", "behaviour", "cause"), MID_STREAM_CASES, ids=[c[0] for c in MID_STREAM_CASES])
async def test_failure_after_first_token_ends_the_stream_precisely(
    chain: tuple[Any, ...], name: str, behaviour: Any, cause: str
) -> None:
    running, modal, vast, _ = chain
    modal.enqueue(behaviour)
    outcome = await call(running.stub, "ChatStream")
    assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert outcome.reason == "STREAM_INTERRUPTED"
    assert outcome.metadata == {"provider": "modal", "cause": cause, "deltas_sent": str(len(outcome.deltas))}
    assert outcome.text == "tok0 tok1 " and outcome.finals == 0  # exactly what was sent, no splice
    assert vast.chat_requests == []  # never continued on another provider
    assert "retry" in outcome.details


@pytest.mark.parametrize(("name", "behaviour", "cause"), MID_STREAM_CASES, ids=[c[0] for c in MID_STREAM_CASES])
async def test_unary_mid_body_failure_is_invisible(
    chain: tuple[Any, ...], name: str, behaviour: Any, cause: str
) -> None:
    running, modal, _vast, _ = chain
    modal.enqueue(behaviour, behaviour)
    outcome = await call(running.stub, "Chat")
    served_by(outcome, "vastai", VAST_TOKENS)
    # Modal was asked, failed part-way for this cause, and its partial answer was dropped.
    modal_reasons = [r for p, r in outcome.attempts if p == "modal"]
    assert modal_reasons and all(r == cause for r in modal_reasons), outcome.attempts
    assert len(modal.chat_requests) == len(modal_reasons)


@pytest.mark.parametrize("rpc", RPCS)
async def test_context_too_long_is_the_callers_mistake(chain: tuple[Any, ...], rpc: str) -> None:
    running, modal, vast, anth = chain
    modal.enqueue(ContextTooLong())
    outcome = await call(running.stub, rpc)
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum context length" in outcome.details
    assert "maximum context length" in outcome.violations["messages"]  # BadRequest names the field
    assert len(modal.chat_requests) == 1 and vast.chat_requests == [] and anth.chat_requests == []


@pytest.mark.parametrize("rpc", RPCS)
async def test_anthropic_serves_when_both_vllm_hosts_fail(chain: tuple[Any, ...], rpc: str) -> None:
    running, modal, vast, anth = chain
    modal.default = Status(503)
    vast.stop_listening()
    outcome = await call(running.stub, rpc, max_tokens=64)
    served_by(outcome, "anthropic", ANTH_TOKENS)
    body = anth.chat_requests[0].json
    # The SDK call is shaped for Anthropic: system at top level, user turn first, max_tokens set.
    assert body["system"] == "be brief" and body["messages"] == [{"role": "user", "content": "hello there"}]
    assert body["max_tokens"] == 64 and body["model"] == "claude-test"
    assert outcome.usage.completion_tokens == len(ANTH_TOKENS)
    assert outcome.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("rpc", RPCS)
async def test_anthropic_529_is_retried(chain: tuple[Any, ...], rpc: str) -> None:
    running, modal, vast, anth = chain
    modal.default, vast.default = Status(500), Status(500)
    anth.enqueue(Overloaded())
    outcome = await call(running.stub, rpc)
    served_by(outcome, "anthropic", ANTH_TOKENS)
    assert outcome.attempts[-2:] == [("anthropic", "PROVIDER_UNAVAILABLE"), ("anthropic", "")]


@pytest.mark.parametrize("rpc", RPCS)
async def test_anthropic_400_is_invalid_argument(chain: tuple[Any, ...], rpc: str) -> None:
    running, modal, vast, anth = chain
    modal.default, vast.default = Status(500), Status(500)
    anth.enqueue(ContextTooLong())
    outcome = await call(running.stub, rpc)
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT and "prompt is too long" in outcome.details


@pytest.mark.parametrize("rpc", RPCS)
async def test_all_providers_failing_lists_each(chain: tuple[Any, ...], rpc: str) -> None:
    running, modal, vast, anth = chain
    modal.default, vast.default, anth.default = Status(500), Status(502), Overloaded()
    outcome = await call(running.stub, rpc)
    assert outcome.code is grpc.StatusCode.UNAVAILABLE and outcome.reason == "ALL_PROVIDERS_FAILED"
    assert outcome.metadata == {
        "modal": "PROVIDER_UNAVAILABLE",
        "vastai": "PROVIDER_UNAVAILABLE",
        "anthropic": "PROVIDER_UNAVAILABLE",
    }
    assert "modal" in outcome.details and "vastai" in outcome.details and "anthropic" in outcome.details
    assert outcome.retry_delay_s is not None and outcome.deltas == []


async def test_auth_failure_opens_the_circuit_and_is_skipped(chain: tuple[Any, ...]) -> None:
    running, modal, _vast, _ = chain
    modal.default = Status(401)
    first = await call(running.stub, "Chat")
    served_by(first, "vastai", VAST_TOKENS)
    assert first.attempts[0] == ("modal", "PROVIDER_AUTH")
    second = await call(running.stub, "ChatStream")
    served_by(second, "vastai", VAST_TOKENS)
    assert [p for p, _ in second.attempts] == ["vastai"]  # skipped: circuit open
    assert len(modal.chat_requests) == 1
    health = await running.stub.Health(pb.HealthRequest())
    modal_health = health.providers[0]
    assert modal_health.circuit_state == pb.CIRCUIT_STATE_OPEN and "credentials refused" in modal_health.last_error


async def test_circuit_opens_after_consecutive_failures_then_half_opens(fakes: Any) -> None:
    modal, vast, _anth = fakes
    for srv in fakes:
        srv.reset()
        if not srv.listening:
            srv.start_listening()
    modal.default, vast.default = Status(500), Ok(tokens=VAST_TOKENS)
    running = await start_gateway(
        chain_settings(modal, vast, None, circuit_failure_threshold=3, circuit_cooldown_s=0.3, retry_max_retries=0)
    )
    try:
        for _ in range(3):
            served_by(await call(running.stub, "Chat"), "vastai", VAST_TOKENS)
        assert len(modal.chat_requests) == 3
        skipped = await call(running.stub, "Chat")
        assert [p for p, _ in skipped.attempts] == ["vastai"] and len(modal.chat_requests) == 3
        import asyncio

        await asyncio.sleep(0.35)
        modal.default = Ok(tokens=MODAL_TOKENS)
        probe = await call(running.stub, "ChatStream")  # half-open: one probe goes through and closes it
        served_by(probe, "modal", MODAL_TOKENS)
        health = await running.stub.Health(pb.HealthRequest())
        assert health.providers[0].circuit_state == pb.CIRCUIT_STATE_CLOSED
    finally:
        await stop_gateway(running)


@pytest.mark.parametrize("rpc", RPCS)
async def test_deadline_is_respected_across_retries(chain: tuple[Any, ...], rpc: str) -> None:
    running, modal, vast, anth = chain
    modal.default, vast.default, anth.default = StallBeforeFirstToken(5.0), StallBeforeFirstToken(5.0), Overloaded()
    started = time.monotonic()
    outcome = await call(running.stub, rpc, timeout=0.6)
    elapsed = time.monotonic() - started
    # Modal's first-token budget (1.5 s) outlasts the deadline: the deadline ends the call, on time.
    assert outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED, outcome
    assert elapsed < 0.6 + 0.4, elapsed
    assert len(modal.chat_requests) == 1 and vast.chat_requests == [] and anth.chat_requests == []


async def test_explicit_unknown_model_everywhere_is_not_found(chain: tuple[Any, ...]) -> None:
    running, modal, vast, anth = chain
    modal.default, vast.default, anth.default = UnknownModel(), UnknownModel(), UnknownModel()
    for _ in range(6):  # more than CIRCUIT_FAILURE_THRESHOLD (5)
        outcome = await call(running.stub, "Chat", model="no-such-model")
        assert outcome.code is grpc.StatusCode.NOT_FOUND and "no-such-model" in outcome.details
        assert MODAL_MODEL in outcome.details  # says what is served instead
    # Both vLLM hosts list their models: a name they do not serve is never sent to them.
    assert modal.chat_requests == [] and vast.chat_requests == []
    # A caller's model choice is not a provider failure: no circuit opened, nobody unhealthy.
    health = await running.stub.Health(pb.HealthRequest())
    assert [p.circuit_state for p in health.providers] == [pb.CIRCUIT_STATE_CLOSED] * 3
    assert pb.PROVIDER_STATE_UNHEALTHY not in [p.state for p in health.providers]
    modal.default = Ok(tokens=MODAL_TOKENS)
    served_by(await call(running.stub, "Chat"), "modal", MODAL_TOKENS)


ANTHROPIC_MID_STREAM = [
    ("event overloaded_error", InBandError(2), "PROVIDER_UNAVAILABLE"),
    ("event invalid_request_error", InBandError(2, error_type="invalid_request_error"), "PROVIDER_PROTOCOL_ERROR"),
    ("reset", ResetAfter(2), "PROVIDER_UNAVAILABLE"),
    ("stall", StallAfter(2, 5.0), "PROVIDER_TIMEOUT"),
    ("no message_stop", EndWithoutFinish(2), "PROVIDER_PROTOCOL_ERROR"),
]


@pytest.mark.parametrize(("name", "behaviour", "cause"), ANTHROPIC_MID_STREAM, ids=[c[0] for c in ANTHROPIC_MID_STREAM])
async def test_anthropic_failure_after_first_token(
    fakes: tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic], name: str, behaviour: Any, cause: str
) -> None:
    _, _, anth = fakes
    anth.reset()
    anth.enqueue(behaviour)
    running = await start_gateway(chain_settings(anthropic=anth))
    try:
        outcome = await call(running.stub, "ChatStream")
        assert outcome.code is grpc.StatusCode.UNAVAILABLE and outcome.reason == "STREAM_INTERRUPTED"
        assert outcome.metadata == {"provider": "anthropic", "cause": cause, "deltas_sent": "2"}
        assert outcome.deltas == ["tok0 ", "tok1 "]  # the SDK yields one event per token
    finally:
        await stop_gateway(running)


async def test_anthropic_stream_cancel_closes_upstream(fakes: tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]) -> None:
    import time

    _, _, anth = fakes
    anth.reset()
    anth.default = Ok(n_tokens=200, delay_s_between_tokens=0.02)
    running = await start_gateway(chain_settings(anthropic=anth))
    try:
        for i in range(20):
            stream = running.stub.ChatStream(
                pb.ChatStreamRequest(messages=[pb.Message(role=pb.ROLE_USER, content="x")])
            )
            assert (await stream.read()).HasField("delta")
            rec = anth.chat_requests[i]
            cancelled_at = time.monotonic()
            stream.cancel()
            await rec.wait_closed_async(2.0)
            assert rec.client_closed and rec.closed_at is not None
            assert rec.closed_at - cancelled_at < 0.1
    finally:
        await stop_gateway(running)
