"""Routing defects found by trying the gateway as a new user would (issue 10): each failed before its fix."""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference.v1 import inference_pb2 as pb

from service.errors import ConfigError
from service.providers.base import retry_after_s
from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider
from tests.conftest import start_gateway, stop_gateway
from tests.routing_helpers import MODAL_MODEL, call, chain_settings
from tests.upstreams import FakeAnthropic, FakeOpenAI, Ok, ResetAfter, StallBeforeFirstToken, Status, UnknownModel

MODAL_TOKENS = ["m1 ", "m2"]
VAST_TOKENS = ["v1 ", "v2"]


def served(outcome: Any, provider: str, tokens: list[str]) -> None:
    assert outcome.code is grpc.StatusCode.OK, (outcome.code, outcome.details)
    assert outcome.provider == provider and outcome.text == "".join(tokens)


async def provider_health(running: Any, name: str) -> pb.ProviderHealth:
    health = await running.stub.Health(pb.HealthRequest())
    return next(p for p in health.providers if p.name == name)


async def test_a_callers_unknown_model_never_opens_a_circuit() -> None:
    # The host's model list is unknown (empty /v1/models), so it is asked, and says 404 every time.
    vast = FakeOpenAI(models=[], strict_models=False).start()
    vast.default = UnknownModel()
    running = await start_gateway(chain_settings(None, vast, circuit_failure_threshold=3))
    try:
        for _ in range(6):
            outcome = await call(running.stub, "Chat", model="claude-x")
            assert outcome.code is grpc.StatusCode.NOT_FOUND, outcome
        assert len(vast.chat_requests) == 6
        h = await provider_health(running, "vastai")
        assert h.circuit_state == pb.CIRCUIT_STATE_CLOSED and h.state != pb.PROVIDER_STATE_UNHEALTHY
        vast.default = Ok(tokens=VAST_TOKENS)
        served(await call(running.stub, "Chat"), "vastai", VAST_TOKENS)  # other tenants still reach it
    finally:
        await stop_gateway(running)
        vast.stop()


async def test_unary_chat_falls_back_on_a_stalled_provider_after_the_first_token_timeout() -> None:
    modal, vast = FakeOpenAI(models=[MODAL_MODEL]).start(), FakeOpenAI(models=[MODAL_MODEL]).start()
    modal.default, vast.default = StallBeforeFirstToken(5.0), Ok(tokens=VAST_TOKENS)
    running = await start_gateway(chain_settings(modal, vast, request_timeout_s=60, ttft_timeout_s=0.5))
    try:
        started = time.monotonic()
        outcome = await call(running.stub, "Chat", timeout=30)
        served(outcome, "vastai", VAST_TOKENS)
        assert outcome.attempts[0] == ("modal", "PROVIDER_TIMEOUT")
        assert time.monotonic() - started < 3.0  # TTFT_TIMEOUT_S, not the 5 s stall or REQUEST_TIMEOUT_S
        # Unary is served over the upstream's streaming API (usage included).
        assert modal.chat_requests[0].json["stream"] is True
        assert vast.chat_requests[0].json["stream_options"] == {"include_usage": True}
        assert outcome.usage.completion_tokens > 0
    finally:
        await stop_gateway(running)
        modal.stop()
        vast.stop()


async def test_a_provider_failing_its_probe_is_still_the_last_fallback() -> None:
    modal, vast = FakeOpenAI(models=[MODAL_MODEL]).start(), FakeOpenAI(models=[MODAL_MODEL]).start()
    vast.health_status = 503  # its probe fails; its chat endpoint works
    modal.default, vast.default = Status(500), Ok(tokens=VAST_TOKENS)
    running = await start_gateway(chain_settings(modal, vast))
    try:
        assert (await provider_health(running, "vastai")).state == pb.PROVIDER_STATE_UNHEALTHY
        for rpc in ("Chat", "ChatStream"):
            outcome = await call(running.stub, rpc)
            served(outcome, "vastai", VAST_TOKENS)
            assert [p for p, _ in outcome.attempts][-1] == "vastai"
    finally:
        await stop_gateway(running)
        modal.stop()
        vast.stop()


async def test_retry_info_carries_the_longest_upstream_retry_after() -> None:
    modal, vast = FakeOpenAI(models=[MODAL_MODEL]).start(), FakeOpenAI(models=[MODAL_MODEL]).start()
    modal.default, vast.default = Status(429, retry_after_s=30), Status(503, retry_after_s=12)
    running = await start_gateway(chain_settings(modal, vast))
    try:
        outcome = await call(running.stub, "Chat")
        assert outcome.code is grpc.StatusCode.UNAVAILABLE and outcome.reason == "ALL_PROVIDERS_FAILED"
        assert outcome.retry_delay_s == 30
        # An interrupted stream says when to retry as well.
        modal.default, vast.default = ResetAfter(2), Ok()
        outcome = await call(running.stub, "ChatStream")
        assert outcome.reason == "STREAM_INTERRUPTED" and outcome.retry_delay_s is not None
    finally:
        await stop_gateway(running)
        modal.stop()
        vast.stop()


class FlakyStart(OpenAICompatProvider):
    """An OpenAI-compatible provider whose first ``failures`` start-ups fail (like a Modal URL lookup)."""

    def __init__(self, base_url: str, failures: int) -> None:
        super().__init__(OpenAICompatConfig(name="modal", base_url=base_url, model=MODAL_MODEL))
        self.failures = failures

    async def start(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConfigError("could not look up the Modal endpoint: connection refused; set MODAL_WEB_URL")
        await super().start()


async def test_startup_survives_a_provider_that_cannot_start() -> None:
    modal, vast = FakeOpenAI(models=[MODAL_MODEL]).start(), FakeOpenAI(models=[MODAL_MODEL]).start()
    modal.default, vast.default = Ok(tokens=MODAL_TOKENS), Ok(tokens=VAST_TOKENS)
    settings = chain_settings(None, vast)
    vast_provider = OpenAICompatProvider(OpenAICompatConfig(name="vastai", base_url=vast.base_url, model=MODAL_MODEL))
    running = await start_gateway(settings, [FlakyStart(modal.base_url, failures=2), vast_provider])
    try:
        h = await provider_health(running, "modal")
        assert h.state == pb.PROVIDER_STATE_UNHEALTHY and "could not look up the Modal endpoint" in h.last_error
        served(await call(running.stub, "Chat"), "vastai", VAST_TOKENS)
        assert (await running.stub.Health(pb.HealthRequest())).status == pb.SERVING_STATUS_SERVING
        # The start-up is retried in the background; once it succeeds, traffic returns.
        deadline = time.monotonic() + 10
        while (await provider_health(running, "modal")).state != pb.PROVIDER_STATE_HEALTHY:
            assert time.monotonic() < deadline, "the failed start-up was never retried"
            await asyncio.sleep(0.1)
        served(await call(running.stub, "Chat"), "modal", MODAL_TOKENS)
    finally:
        await stop_gateway(running)
        modal.stop()
        vast.stop()


async def check(running: Any) -> int:
    stub = health_pb2_grpc.HealthStub(running.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service="inference.v1.InferenceService"))
    return int(response.status)


async def test_modal_only_with_refused_credentials_is_not_serving() -> None:
    modal = FakeOpenAI(models=[MODAL_MODEL], required_headers={"Modal-Key": "wk-1", "Modal-Secret": "ws-1"}).start()
    running = await start_gateway(chain_settings(modal))  # no proxy token configured: every request is a 401
    try:
        assert await check(running) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (await running.stub.Health(pb.HealthRequest())).status == pb.SERVING_STATUS_NOT_SERVING
    finally:
        await stop_gateway(running)
        modal.stop()


async def test_standard_health_follows_call_outcomes() -> None:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    running = await start_gateway(chain_settings(None, vast))  # probes every hour: only calls can tell
    try:
        assert await check(running) == health_pb2.HealthCheckResponse.SERVING
        vast.default = Status(401)  # the gateway's credentials were revoked
        outcome = await call(running.stub, "Chat")
        assert outcome.code is grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 5
        while await check(running) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "grpc.health.v1 never heard of the failed calls"
            await asyncio.sleep(0.05)
    finally:
        await stop_gateway(running)
        vast.stop()


async def test_floats_reach_the_upstream_as_written() -> None:
    modal = FakeOpenAI(models=[MODAL_MODEL]).start()
    running = await start_gateway(chain_settings(modal))
    try:
        assert (await call(running.stub, "Chat", temperature=0.7, top_p=0.9)).code is grpc.StatusCode.OK
        sent = modal.chat_requests[0].json
        assert sent["temperature"] == 0.7 and sent["top_p"] == 0.9  # not 0.699999988079071
        assert b'"temperature":0.7,' in modal.chat_requests[0].body
    finally:
        await stop_gateway(running)
        modal.stop()


async def test_a_model_name_goes_only_to_the_providers_that_serve_it() -> None:
    modal, vast, anth = (
        FakeOpenAI(models=[MODAL_MODEL]).start(),
        FakeOpenAI(models=[MODAL_MODEL]).start(),
        FakeAnthropic(),
    )
    anth.start()
    modal.default, vast.default = Status(500), Status(500)
    running = await start_gateway(chain_settings(modal, vast, anth))
    try:
        outcome = await call(running.stub, "Chat", model=MODAL_MODEL)
        assert outcome.code is grpc.StatusCode.UNAVAILABLE
        assert anth.chat_requests == []  # never asked for a Qwen model
        assert "anthropic" not in [p for p, _ in outcome.attempts]
        # A name nobody serves is NOT_FOUND before any upstream is called.
        before = len(modal.chat_requests) + len(vast.chat_requests)
        outcome = await call(running.stub, "Chat", model="gpt-nothing")
        assert outcome.code is grpc.StatusCode.NOT_FOUND and "gpt-nothing" in outcome.details
        assert len(modal.chat_requests) + len(vast.chat_requests) == before and anth.chat_requests == []
    finally:
        await stop_gateway(running)
        for srv in (modal, vast, anth):
            srv.stop()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        ("0.5", 0.5),
        ("Sun, 29 Nov 2026 12:00:30 GMT", 30.0),  # HTTP-date: 30 s after "now"
        ("Sun, 29 Nov 2026 11:00:00 GMT", 0.0),  # a date in the past: now
        ("nan", None),
        ("inf", None),
        ("-5", None),
        ("99999999", None),  # absurd: over a day
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_forms(header: str | None, expected: float | None) -> None:
    now = datetime.datetime(2026, 11, 29, 12, 0, 0, tzinfo=datetime.UTC).timestamp()
    assert retry_after_s(header, now=now) == expected


async def test_queueing_for_a_pooled_connection_is_not_the_providers_first_token_time() -> None:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    # One connection only; the first call holds it for ~1.5 s, longer than the first-token budget.
    vast.enqueue(Ok(tokens=["a ", "b ", "c ", "d ", "e ", "f"], delay_s_between_tokens=0.3))
    vast.default = Ok(tokens=VAST_TOKENS)
    provider = OpenAICompatProvider(
        OpenAICompatConfig(name="vastai", base_url=vast.base_url, model=MODAL_MODEL, max_connections=1)
    )
    running = await start_gateway(chain_settings(None, vast, ttft_timeout_s=0.8), [provider])
    try:
        first = asyncio.create_task(call(running.stub, "ChatStream"))
        await asyncio.to_thread(vast.wait_for_requests, 1, 5.0)
        second = await call(running.stub, "Chat")
        served(second, "vastai", VAST_TOKENS)
        assert second.attempts == [("vastai", "")]  # waited for the pool, then was served: no timeout booked
        assert (await first).code is grpc.StatusCode.OK
        assert (await provider_health(running, "vastai")).state == pb.PROVIDER_STATE_HEALTHY
    finally:
        await stop_gateway(running)
        vast.stop()


async def test_connections_are_recycled_when_max_connection_age_is_set() -> None:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    running = await start_gateway(
        chain_settings(None, vast, grpc_max_connection_age_s=0.5, grpc_max_connection_age_grace_s=5)
    )
    try:
        # A stream open across the GOAWAY finishes in the grace period; the channel reconnects after it.
        vast.default = Ok(tokens=["a ", "b ", "c ", "d"], delay_s_between_tokens=0.25)
        served(await call(running.stub, "ChatStream", timeout=10), "vastai", ["a ", "b ", "c ", "d"])
        # The server said GOAWAY at the connection's age: the client's channel is no longer READY.
        deadline = time.monotonic() + 5
        while running.channel.get_state() is grpc.ChannelConnectivity.READY:
            assert time.monotonic() < deadline, "the connection was never recycled"
            await asyncio.sleep(0.05)
        vast.default = Ok(tokens=VAST_TOKENS)
        served(await call(running.stub, "Chat"), "vastai", VAST_TOKENS)
    finally:
        await stop_gateway(running)
        vast.stop()
