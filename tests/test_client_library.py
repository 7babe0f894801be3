"""The client library over a real gRPC server: the sync and async clients offer the same calls and
options, retries follow the caller's policy, a stream is one call, and INFERENCE_* are defaults."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from inference.v1 import inference_pb2 as pb

from clients import (
    AsyncInferenceClient,
    ClientConfigError,
    InferenceClient,
    RateLimitedError,
    RetryPolicy,
    UnavailableError,
)
from tests.client_helpers import Failure, ScriptedServer

UNAVAILABLE = Failure("UNAVAILABLE", "every provider failed")
FAST = RetryPolicy(max_retries=3, initial_delay_s=0.01, max_delay_s=0.02)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as running:
        yield running


ALL_OPTIONS = {
    "messages": [("user", "earlier"), {"role": "assistant", "content": "reply"}],
    "system": "be brief",
    "model": "some-model",
    "temperature": 0.5,
    "top_p": 0.9,
    "max_tokens": 7,
    "stop": ["END", "STOP"],
    "seed": 42,
    "wait_for_cold_start": True,
}


def _assert_request_carries_all_options(request: pb.ChatRequest | pb.ChatStreamRequest) -> None:
    assert [(m.role, m.content) for m in request.messages] == [
        (pb.ROLE_SYSTEM, "be brief"),
        (pb.ROLE_USER, "earlier"),
        (pb.ROLE_ASSISTANT, "reply"),
        (pb.ROLE_USER, "hi"),
    ]
    assert request.model == "some-model" and request.max_tokens == 7 and request.seed == 42
    assert request.temperature == pytest.approx(0.5) and request.top_p == pytest.approx(0.9)
    assert list(request.stop) == ["END", "STOP"]
    assert request.cold_start_policy == pb.COLD_START_POLICY_WAIT


def test_sync_and_async_clients_have_the_same_calls_and_options() -> None:
    for name in ("chat", "chat_stream", "health", "provider_status", "close"):
        sync, aio = getattr(InferenceClient, name), getattr(AsyncInferenceClient, name)
        assert inspect.signature(sync).parameters.keys() == inspect.signature(aio).parameters.keys(), name


def test_sync_stream_takes_every_option_and_has_text(server: ScriptedServer) -> None:
    with InferenceClient(server.target) as client:
        with client.chat_stream("hi", **ALL_OPTIONS) as stream:  # type: ignore[arg-type]
            parts = list(stream)
        client.chat("hi", **ALL_OPTIONS)  # type: ignore[arg-type]

    assert parts == ["who", "le"] and stream.text == "whole"
    assert stream.final is not None and stream.final.text == "whole" and stream.usage is not None
    for received in server.servicer.calls():
        _assert_request_carries_all_options(received.request)


async def test_async_calls_take_every_option(server: ScriptedServer) -> None:
    async with AsyncInferenceClient(server.target) as client:
        await client.chat("hi", **ALL_OPTIONS)  # type: ignore[arg-type]
        async with client.chat_stream("hi", **ALL_OPTIONS) as stream:  # type: ignore[arg-type]
            assert [t async for t in stream] == ["who", "le"]
    assert stream.text == "whole"
    for received in server.servicer.calls():
        _assert_request_carries_all_options(received.request)


def test_unknown_option_is_a_type_error_not_silence(server: ScriptedServer) -> None:
    with InferenceClient(server.target) as client, pytest.raises(TypeError, match="max_token"):
        client.chat("hi", max_token=5)  # type: ignore[call-arg]
    assert server.servicer.calls() == []


def test_sync_stream_is_retried_before_text_like_the_async_one(server: ScriptedServer) -> None:
    server.servicer.failures.extend([UNAVAILABLE, UNAVAILABLE])
    with InferenceClient(server.target, retry=FAST) as client, client.chat_stream("hi") as stream:
        assert list(stream) == ["who", "le"]
    assert len(server.servicer.calls("ChatStream")) == 3


def test_a_stream_iterated_twice_is_one_call(server: ScriptedServer) -> None:
    with InferenceClient(server.target) as client:
        stream = client.chat_stream("hi")
        assert server.servicer.calls() == []  # nothing is sent before the first iteration
        with stream:
            assert list(stream) == ["who", "le"]
            assert list(stream) == []  # the same call, already finished: not sent again
    assert len(server.servicer.calls("ChatStream")) == 1 and stream.text == "whole"


async def test_an_async_stream_iterated_twice_is_one_call(server: ScriptedServer) -> None:
    async with AsyncInferenceClient(server.target) as client, client.chat_stream("hi") as stream:
        assert [t async for t in stream] == ["who", "le"]
        assert [t async for t in stream] == []
    assert len(server.servicer.calls("ChatStream")) == 1


@pytest.mark.parametrize("retries", [0, 1])
def test_retry_count_is_the_callers(server: ScriptedServer, retries: int) -> None:
    server.servicer.failures.extend([UNAVAILABLE] * 5)
    policy = RetryPolicy(max_retries=retries, initial_delay_s=0.01)
    with InferenceClient(server.target, retry=policy) as client, pytest.raises(UnavailableError):
        client.chat("hi")
    assert len(server.servicer.calls("Chat")) == 1 + retries


async def test_per_call_policy_overrides_the_clients(server: ScriptedServer) -> None:
    server.servicer.failures.extend([UNAVAILABLE] * 2)
    async with AsyncInferenceClient(server.target, retry=RetryPolicy(max_retries=0)) as client:
        assert (await client.chat("hi", retry=FAST)).text == "whole"
    assert len(server.servicer.calls("Chat")) == 3


def test_rate_limited_is_not_retried_unless_the_caller_opts_in(server: ScriptedServer) -> None:
    busy = Failure("RESOURCE_EXHAUSTED", "too many calls", retry_after_s=0.3, reason="CONCURRENCY")
    server.servicer.failures.append(busy)
    with InferenceClient(server.target) as client:
        with pytest.raises(RateLimitedError) as info:
            client.chat("hi")
        assert info.value.retry_after_s == pytest.approx(0.3)
        assert len(server.servicer.calls()) == 1

        server.servicer.failures.append(busy)
        opted_in = RetryPolicy(retry_rate_limited=True)
        with client.chat_stream("hi", retry=opted_in) as stream:
            assert list(stream) == ["who", "le"]
    first, second = server.servicer.calls("ChatStream")
    assert second.at - first.at >= 0.25  # after the delay the server asked for (a lower bound only)


async def test_rate_limited_without_retry_info_is_not_retried_even_when_opted_in(server: ScriptedServer) -> None:
    # gRPC's own RESOURCE_EXHAUSTED (a message too large) carries no RetryInfo: retrying cannot help.
    server.servicer.failures.append(Failure("RESOURCE_EXHAUSTED", "message larger than max"))
    async with AsyncInferenceClient(server.target, retry=RetryPolicy(retry_rate_limited=True)) as client:
        with pytest.raises(RateLimitedError):
            await client.chat("hi")
    assert len(server.servicer.calls()) == 1


def test_retry_policy_rejects_negative_values() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        RetryPolicy(max_retries=-1)


async def test_environment_supplies_target_and_api_key(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_TARGET", server.target)
    monkeypatch.setenv("INFERENCE_API_KEY", "key-from-env")
    async with AsyncInferenceClient() as client:
        assert client.target == server.target
        await client.chat("hi")

    def sync_calls() -> None:
        with InferenceClient() as plain:
            plain.health()
        with InferenceClient(api_key="") as anonymous:  # "" turns the environment's key off
            anonymous.health()

    await asyncio.to_thread(sync_calls)
    chat, health, anonymous = server.servicer.calls()
    assert chat.metadata["authorization"] == health.metadata["authorization"] == "Bearer key-from-env"
    assert "authorization" not in anonymous.metadata


def test_explicit_arguments_win_over_the_environment(server: ScriptedServer) -> None:
    env = {"INFERENCE_TARGET": "127.0.0.1:1", "INFERENCE_API_KEY": "env-key"}
    with InferenceClient(server.target, api_key="arg-key", env=env) as client:
        client.chat("hi")
    assert server.servicer.calls()[0].metadata["authorization"] == "Bearer arg-key"


def test_unreadable_ca_file_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ClientConfigError, match=r"cannot read the CA file .*nope\.pem.*\(from INFERENCE_CA_FILE\)"):
        InferenceClient(env={"INFERENCE_CA_FILE": str(missing)})
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello")
    with pytest.raises(ClientConfigError, match="holds no PEM certificate"):
        AsyncInferenceClient(ca_file=not_pem)


def test_timeout_bounds_the_retries(server: ScriptedServer) -> None:
    server.servicer.failures.extend([Failure("UNAVAILABLE", retry_after_s=1.0)] * 10)
    started = time.monotonic()
    with InferenceClient(server.target) as client, pytest.raises(UnavailableError):
        client.chat("hi", timeout_s=1.5)
    assert time.monotonic() - started < 1.5
    assert len(server.servicer.calls()) == 2
