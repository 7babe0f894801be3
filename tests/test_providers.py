"""Provider construction and provider-specific behaviour: chain order, Modal auth headers and URL
lookup, model mismatch reporting, Anthropic message shaping."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from inference.v1 import inference_pb2 as pb

from modal_vllm.sdk import FunctionStats
from service.config import Settings
from service.errors import ConfigError
from service.providers.anthropic import LEADING_USER_TURN, finish_reason, to_anthropic
from service.providers.base import ChatMessage, FinishReason
from service.providers.registry import build_chain, plan_chain
from tests.conftest import start_gateway, stop_gateway
from tests.routing_helpers import MODAL_MODEL, call, chain_settings
from tests.upstreams import FakeOpenAI, Ok


def names(env: dict[str, str]) -> list[str]:
    return [n for n, _ in plan_chain(Settings.from_env(env))]


def test_chain_order_is_detected_from_configuration() -> None:
    assert names({}) == ["local"]
    assert names({"ANTHROPIC_API_KEY": "k"}) == ["anthropic"]
    assert names({"ANTHROPIC_API_KEY": "k", "VASTAI_VLLM_URL": "http://v", "MODAL_WEB_URL": "https://m"}) == [
        "modal",
        "vastai",
        "anthropic",
    ]
    assert names({"MODAL_TOKEN_ID": "id", "MODAL_TOKEN_SECRET": "s"}) == ["modal"]


def test_provider_order_overrides_and_can_include_local() -> None:
    env = {"ANTHROPIC_API_KEY": "k", "MODAL_WEB_URL": "https://m", "PROVIDER_ORDER": "anthropic,modal,local"}
    assert names(env) == ["anthropic", "modal", "local"]
    with pytest.raises(ConfigError, match="PROVIDER_ORDER names 'vastai' but VASTAI_VLLM_URL is not set"):
        names({"PROVIDER_ORDER": "vastai"})


def test_chain_reasons_are_explained() -> None:
    (reason,) = [why for _, why in plan_chain(Settings.from_env({}))]
    assert "no remote provider is configured" in reason
    built = build_chain(Settings.from_env({"MODAL_WEB_URL": "https://ws--multi-agent-vllm-inference-serve.modal.run"}))
    assert [(p.name, p.kind, p.scale_to_zero, p.default_model) for p in built] == [("modal", "vllm", True, MODAL_MODEL)]


async def test_modal_sends_proxy_auth_and_api_key_headers() -> None:
    modal = FakeOpenAI(
        models=[MODAL_MODEL], api_key="vllm-key", required_headers={"Modal-Key": "wk-123", "Modal-Secret": "ws-456"}
    ).start()
    modal.default = Ok(tokens=["ok"])
    settings = chain_settings(
        modal, modal_proxy_token_id="wk-123", modal_proxy_token_secret="ws-456", modal_vllm_api_key="vllm-key"
    )
    running = await start_gateway(settings)
    try:
        outcome = await call(running.stub, "ChatStream")
        assert outcome.code is grpc.StatusCode.OK and outcome.provider == "modal"
        headers = modal.chat_requests[0].headers
        assert headers["modal-key"] == "wk-123" and headers["modal-secret"] == "ws-456"
        assert headers["authorization"] == "Bearer vllm-key"
    finally:
        await stop_gateway(running)
        modal.stop()


async def test_modal_without_proxy_token_is_an_auth_error_that_falls_back() -> None:
    modal = FakeOpenAI(models=[MODAL_MODEL], required_headers={"Modal-Key": "wk", "Modal-Secret": "ws"}).start()
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    vast.default = Ok(tokens=["v"])
    running = await start_gateway(chain_settings(modal, vast))
    try:
        health = await running.stub.Health(pb.HealthRequest())
        assert "MODAL_PROXY_TOKEN" in health.providers[0].last_error  # the status probe says what to set
        # Modal answered 401 at startup, so it is not cold: it is tried, refused, and skipped after.
        outcome = await call(running.stub, "Chat")
        assert outcome.code is grpc.StatusCode.OK and outcome.provider == "vastai"
    finally:
        await stop_gateway(running)
        modal.stop()
        vast.stop()


async def test_model_mismatch_is_reported_with_the_served_models(caplog: pytest.LogCaptureFixture) -> None:
    modal = FakeOpenAI(models=["meta-llama/Llama-3.1-8B-Instruct"]).start()
    caplog.set_level(logging.INFO)
    running = await start_gateway(chain_settings(modal))
    try:
        health = await running.stub.Health(pb.HealthRequest())
        error = health.providers[0].last_error
        assert f"MODAL_MODEL='{MODAL_MODEL}'" in error and "meta-llama/Llama-3.1-8B-Instruct" in error
        outcome = await call(running.stub, "Chat")
        assert outcome.code is grpc.StatusCode.UNAVAILABLE
        assert "MODAL_MODEL" in outcome.details and "meta-llama/Llama-3.1-8B-Instruct" in outcome.details
        assert any("provider 0 modal" in r.getMessage() for r in caplog.records)  # startup says what is active
    finally:
        await stop_gateway(running)
        modal.stop()


async def test_modal_url_is_looked_up_when_only_a_token_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import modal_vllm.status as status

    modal = FakeOpenAI(models=[MODAL_MODEL]).start()
    modal.default = Ok(tokens=["hi"])
    seen: dict[str, Any] = {}

    async def fake_resolve(env: dict[str, str], **_: Any) -> status.ResolvedEndpoint:
        seen.update(env)
        return status.ResolvedEndpoint(url=modal.base_url, source="modal-sdk")

    monkeypatch.setattr(status, "resolve_endpoint_async", fake_resolve)
    # With a token the provider reads Modal's container count: one runs (never the real API in tests).
    monkeypatch.setattr("modal_vllm.sdk.modal_sdk_stats", lambda app, function, env: FunctionStats(1, 0))
    settings = chain_settings(modal_token_id="ak-1", modal_token_secret="as-2")
    running = await start_gateway(settings)
    try:
        assert seen["MODAL_TOKEN_ID"] == "ak-1" and seen["MODAL_TOKEN_SECRET"] == "as-2"
        outcome = await call(running.stub, "Chat")
        assert outcome.provider == "modal" and outcome.text == "hi"
    finally:
        await stop_gateway(running)
        modal.stop()


def test_anthropic_message_shaping() -> None:
    msgs = (
        ChatMessage("system", "a"),
        ChatMessage("assistant", "x"),
        ChatMessage("system", "b"),
        ChatMessage("user", "u1"),
        ChatMessage("user", "u2"),
        ChatMessage("assistant", "y"),
    )
    system, turns = to_anthropic(msgs)
    assert system == "a\n\nb"
    assert turns == [
        {"role": "user", "content": LEADING_USER_TURN},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "u1\n\nu2"},
        {"role": "assistant", "content": "y"},
    ]
    assert [finish_reason(r) for r in ("end_turn", "stop_sequence", "max_tokens", "tool_use", "refusal", None)] == [
        FinishReason.STOP,
        FinishReason.STOP,
        FinishReason.LENGTH,
        FinishReason.TOOL_CALLS,
        FinishReason.CONTENT_FILTER,
        FinishReason.UNSPECIFIED,
    ]
