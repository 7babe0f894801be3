"""The fault matrix at Anthropic's position: every upstream fault, injected by the Anthropic
stand-in and met by the real anthropic SDK, through a real gateway, for both RPCs.

Two chains (``PROVIDER_ORDER``), with a vLLM stand-in (``vastai``) as the other provider:

* ``first``: anthropic -> vastai. A fault before the first token falls back to vastai invisibly;
  after it, the stream ends with STREAM_INTERRUPTED and vastai is never asked.
* ``last``: vastai (answering 500) -> anthropic. Nothing is left to fall back to: the call ends
  UNAVAILABLE with ALL_PROVIDERS_FAILED naming both, or STREAM_INTERRUPTED after a first token.

How many requests Anthropic gets for one fault depends on whether the gateway asked for a stream
on the wire (unary Chat may be served over the streaming API), so each case states both and the
test reads which one the stand-in saw.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio

from tests.conftest import RunningGateway, start_gateway, stop_gateway
from tests.routing_helpers import MODAL_MODEL, Outcome, call, chain_settings
from tests.upstreams import (
    Behaviour,
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
VAST_TOKENS = ["v1 ", "v2 ", "v3"]
ANTH_TOKENS = ["a1 ", "a2"]
UNAVAILABLE, TIMEOUT, PROTOCOL = "PROVIDER_UNAVAILABLE", "PROVIDER_TIMEOUT", "PROVIDER_PROTOCOL_ERROR"
CHAINS = {"first": ("anthropic", "vastai"), "last": ("vastai", "anthropic")}


@dataclass(frozen=True)
class Fault:
    """One fault before the first token, and what Anthropic's attempts look like.

    ``unary``/``stream``: (requests Anthropic receives, error reason of each attempt) when the
    gateway sent a non-streamed / streamed request. Two requests mean one retry.
    """

    name: str
    behaviour: Behaviour
    unary: tuple[int, str]
    stream: tuple[int, str]


def same(name: str, behaviour: Behaviour, n: int, reason: str) -> Fault:
    """A fault that looks the same on a unary and a streamed request."""
    return Fault(name, behaviour, (n, reason), (n, reason))


FAULTS = [
    same("500", Status(500), 2, UNAVAILABLE),
    same("502", Status(502), 2, UNAVAILABLE),
    same("503", Status(503), 2, UNAVAILABLE),
    same("529 overloaded_error", Overloaded(), 2, UNAVAILABLE),
    same("429 short Retry-After", Status(429, retry_after_s=0.15), 2, UNAVAILABLE),
    same("429 long Retry-After", Status(429, retry_after_s=30), 1, UNAVAILABLE),
    same("reset before response", ResetBeforeResponse(), 2, UNAVAILABLE),
    same("stall before first token", StallBeforeFirstToken(5.0), 1, TIMEOUT),
    same("stall before the response head", StallBeforeFirstToken(5.0, send_headers=False), 1, TIMEOUT),
    same("malformed", MalformedSSE(0), 1, PROTOCOL),
    # Unary: a 500 api_error (retried). Stream: `event: error` in a 200 response.
    same("in-band overloaded_error", InBandError(0, "Overloaded"), 2, UNAVAILABLE),
    Fault(
        "in-band invalid_request_error",
        InBandError(0, error_type="invalid_request_error"),
        (2, UNAVAILABLE),
        (1, PROTOCOL),
    ),
    same("end without stop reason", EndWithoutFinish(0), 1, PROTOCOL),
    same("unknown model", UnknownModel(), 1, "PROVIDER_MODEL_NOT_FOUND"),
    same("401", Status(401), 1, "PROVIDER_AUTH"),
    same("403", Status(403), 1, "PROVIDER_AUTH"),
]

# (name, behaviour after two tokens, the cause reported to the caller)
MID_STREAM = [
    ("reset", ResetAfter(2), UNAVAILABLE),
    ("stall", StallAfter(2, 5.0), TIMEOUT),
    ("event overloaded_error", InBandError(2, "Overloaded"), UNAVAILABLE),
    ("event invalid_request_error", InBandError(2, error_type="invalid_request_error"), PROTOCOL),
    ("malformed event", MalformedSSE(2), PROTOCOL),
    ("no message_delta", EndWithoutFinish(2), PROTOCOL),
]


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeAnthropic, FakeOpenAI]]:
    """The Anthropic stand-in and a vLLM stand-in, shared by the module (reset per test)."""
    anth, vast = FakeAnthropic(), FakeOpenAI(models=[MODAL_MODEL])
    anth.start(), vast.start()
    yield anth, vast
    anth.stop(), vast.stop()


@dataclass
class Chain:
    """A running gateway over the two stand-ins, in one order."""

    running: RunningGateway
    anth: FakeAnthropic
    vast: FakeOpenAI
    position: str

    async def call(self, rpc: str, **fields: Any) -> Outcome:
        """Runs one call through the gateway."""
        return await call(self.running.stub, rpc, **fields)

    @staticmethod
    def anthropic_attempts(outcome: Outcome) -> list[str]:
        """The error reason of each Anthropic attempt (a served call lists its attempts)."""
        return [reason for provider, reason in outcome.attempts if provider == "anthropic"]


@pytest_asyncio.fixture(params=list(CHAINS))
async def chain(request: pytest.FixtureRequest, fakes: tuple[FakeAnthropic, FakeOpenAI]) -> AsyncIterator[Chain]:
    """A gateway with Anthropic ``first`` (vastai healthy behind it) or ``last`` (vastai failing)."""
    anth, vast = fakes
    for srv in fakes:
        srv.reset()
        if not srv.listening:
            srv.start_listening()
    anth.default, vast.default = Ok(tokens=ANTH_TOKENS), Ok(tokens=VAST_TOKENS)
    position = request.param
    running = await start_gateway(chain_settings(vast=vast, anthropic=anth, provider_order=CHAINS[position]))
    if position == "last":
        vast.default = Status(500)
    yield Chain(running, anth, vast, position)
    await stop_gateway(running)
    for srv in fakes:
        assert srv.errors == [], srv.errors


def served_by_vastai(outcome: Outcome) -> None:
    """The caller got exactly vastai's text, once, from vastai."""
    assert outcome.code is grpc.StatusCode.OK, (outcome.code, outcome.details)
    assert outcome.provider == "vastai" and outcome.text == "".join(VAST_TOKENS)
    assert outcome.attempts[-1] == ("vastai", "")
    if outcome.deltas:
        assert outcome.finals == 1


def all_failed(outcome: Outcome, anthropic_reason: str) -> None:
    """UNAVAILABLE naming both providers, nothing streamed, a retry hint."""
    assert outcome.code is grpc.StatusCode.UNAVAILABLE, (outcome.code, outcome.details)
    assert outcome.reason == "ALL_PROVIDERS_FAILED"
    assert outcome.metadata == {"vastai": UNAVAILABLE, "anthropic": anthropic_reason}
    assert "anthropic" in outcome.details and "vastai" in outcome.details
    assert outcome.deltas == [] and outcome.text == "" and outcome.retry_delay_s is not None


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_fault_before_the_first_token(chain: Chain, rpc: str, fault: Fault) -> None:
    chain.anth.default = fault.behaviour
    outcome = await chain.call(rpc)
    records = chain.anth.chat_requests
    n, reason = fault.stream if records[0].json.get("stream") else fault.unary
    assert len(records) == n
    if n == 2 and isinstance(fault.behaviour, Status) and fault.behaviour.retry_after_s:
        # The retry waited as long as Anthropic asked (the backoff alone is at most 0.02 s here).
        assert records[1].received_at - records[0].received_at >= fault.behaviour.retry_after_s
    if chain.position == "first":
        served_by_vastai(outcome)
        assert chain.anthropic_attempts(outcome) == [reason] * n and len(chain.vast.chat_requests) == 1
    else:
        all_failed(outcome, reason)


@pytest.mark.parametrize("rpc", RPCS)
async def test_refused_connections(chain: Chain, rpc: str) -> None:
    chain.anth.stop_listening()
    outcome = await chain.call(rpc)
    if chain.position == "first":
        served_by_vastai(outcome)
        assert chain.anthropic_attempts(outcome) == [UNAVAILABLE, UNAVAILABLE]  # a connect error is retried once
    else:
        all_failed(outcome, UNAVAILABLE)


@pytest.mark.parametrize(("name", "behaviour", "cause"), MID_STREAM, ids=[c[0] for c in MID_STREAM])
async def test_failure_after_the_first_token_ends_the_stream(
    chain: Chain, name: str, behaviour: Behaviour, cause: str
) -> None:
    chain.anth.enqueue(behaviour)
    outcome = await chain.call("ChatStream")
    assert outcome.code is grpc.StatusCode.UNAVAILABLE and outcome.reason == "STREAM_INTERRUPTED"
    assert outcome.metadata == {"provider": "anthropic", "cause": cause, "deltas_sent": str(len(outcome.deltas))}
    assert outcome.text == "tok0 tok1 " and outcome.finals == 0  # exactly what was sent, nothing spliced
    vast_asked = 0 if chain.position == "first" else 2  # last: vastai failed (and was retried) before
    assert len(chain.vast.chat_requests) == vast_asked and len(chain.anth.chat_requests) == 1


@pytest.mark.parametrize(("name", "behaviour", "cause"), MID_STREAM, ids=[c[0] for c in MID_STREAM])
async def test_unary_failure_mid_answer_is_never_partly_delivered(
    chain: Chain, name: str, behaviour: Behaviour, cause: str
) -> None:
    chain.anth.default = behaviour
    outcome = await chain.call("Chat")
    if chain.position == "first":
        served_by_vastai(outcome)
    else:
        assert outcome.code is grpc.StatusCode.UNAVAILABLE and outcome.reason == "ALL_PROVIDERS_FAILED"
        assert outcome.text == "" and set(outcome.metadata) == {"vastai", "anthropic"}


@pytest.mark.parametrize("rpc", RPCS)
async def test_a_callers_mistake_is_not_sent_elsewhere(chain: Chain, rpc: str) -> None:
    chain.anth.default = ContextTooLong()
    outcome = await chain.call(rpc)
    # Also as the last resort: the caller's own mistake, not "every provider failed".
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT and "prompt is too long" in outcome.details
    assert "prompt is too long" in outcome.violations["messages"]
    vast_asked = 0 if chain.position == "first" else 2
    assert len(chain.anth.chat_requests) == 1 and len(chain.vast.chat_requests) == vast_asked


@pytest.mark.parametrize("rpc", RPCS)
async def test_anthropic_serves_when_healthy(chain: Chain, rpc: str) -> None:
    """The control case: without a fault, each chain is served by the provider expected."""
    outcome = await chain.call(rpc, temperature=0.2, top_p=0.9, stop=["\n"])
    assert outcome.code is grpc.StatusCode.OK, outcome.details
    assert outcome.provider == "anthropic" and outcome.text == "".join(ANTH_TOKENS)
    expected = [("anthropic", "")] if chain.position == "first" else [("vastai", UNAVAILABLE)] * 2 + [("anthropic", "")]
    assert outcome.attempts == expected
