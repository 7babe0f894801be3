"""Unit tests: request validation (proto -> domain), error -> status mapping, config parsing."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from inference.v1 import inference_pb2 as pb

from service.api.status import code_for, to_rpc_status
from service.api.validation import to_domain
from service.config import Settings
from service.errors import (
    AllProvidersFailedError,
    ConfigError,
    InvalidRequestError,
    ProviderUnavailableError,
    ResourceExhaustedError,
    StreamInterruptedError,
)

SETTINGS = Settings()


def user(text: str = "hi") -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=text)


def violations(request: pb.ChatRequest) -> dict[str, str]:
    with pytest.raises(InvalidRequestError) as info:
        to_domain(request, SETTINGS)
    return {v.field: v.description for v in info.value.violations}


def test_valid_request_converts_with_defaults() -> None:
    req, policy = to_domain(
        pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_SYSTEM, content="be brief"), user()]), SETTINGS
    )
    assert [m.role for m in req.messages] == ["system", "user"]
    assert req.model is None and req.temperature is None and req.top_p is None
    assert req.max_tokens == SETTINGS.default_max_tokens and policy is None


def test_optional_fields_distinguish_zero_from_unset() -> None:
    req, _ = to_domain(
        pb.ChatRequest(
            messages=[user()], temperature=0.0, seed=0, model="x", cold_start_policy=pb.COLD_START_POLICY_WAIT
        ),
        SETTINGS,
    )
    assert req.temperature == 0.0 and req.seed == 0 and req.model == "x"
    assert (
        to_domain(pb.ChatStreamRequest(messages=[user()], cold_start_policy=pb.COLD_START_POLICY_WAIT), SETTINGS)[1]
        == "wait"
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ChatRequest(), "messages"),
        (pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_UNSPECIFIED, content="x")]), "messages[0].role"),
        (pb.ChatRequest(messages=[pb.Message(role=42, content="x")]), "messages[0].role"),  # type: ignore[arg-type]
        (pb.ChatRequest(messages=[user("   ")]), "messages[0].content"),
        (pb.ChatRequest(messages=[user()], temperature=2.5), "temperature"),
        (pb.ChatRequest(messages=[user()], temperature=-0.1), "temperature"),
        (pb.ChatRequest(messages=[user()], temperature=float("nan")), "temperature"),
        (pb.ChatRequest(messages=[user()], top_p=0.0), "top_p"),
        (pb.ChatRequest(messages=[user()], top_p=1.5), "top_p"),
        (pb.ChatRequest(messages=[user()], max_tokens=0), "max_tokens"),
        (pb.ChatRequest(messages=[user()], max_tokens=SETTINGS.max_tokens_cap + 1), "max_tokens"),
        (pb.ChatRequest(messages=[user()], stop=["a", "b", "c", "d", "e"]), "stop"),
        (pb.ChatRequest(messages=[user()], stop=[""]), "stop[0]"),
        (pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_SYSTEM, content="only system")]), "messages"),
        (pb.ChatRequest(messages=[user()], cold_start_policy=9), "cold_start_policy"),  # type: ignore[arg-type]
    ],
)
def test_bad_fields_are_named(request_: pb.ChatRequest, field: str) -> None:
    assert field in violations(request_)


def test_every_bad_field_is_reported_at_once() -> None:
    bad = violations(
        pb.ChatRequest(
            messages=[user(""), pb.Message(role=pb.ROLE_UNSPECIFIED, content="x")], temperature=9, max_tokens=-1
        )
    )
    assert set(bad) == {"messages[0].content", "messages[1].role", "temperature", "max_tokens"}


def test_status_table() -> None:
    assert code_for(InvalidRequestError("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_for(AllProvidersFailedError({})) is grpc.StatusCode.UNAVAILABLE
    assert code_for(ResourceExhaustedError("busy", 1.0)) is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_all_failed_status_lists_each_provider() -> None:
    err = AllProvidersFailedError(
        {"modal": ProviderUnavailableError("modal", "503"), "anthropic": ProviderUnavailableError("anthropic", "529")}
    )
    status = to_rpc_status(err)
    assert "modal" in status.message and "anthropic" in status.message
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "ALL_PROVIDERS_FAILED"
    assert dict(info.metadata) == {"modal": "PROVIDER_UNAVAILABLE", "anthropic": "PROVIDER_UNAVAILABLE"}
    assert status.details[1].Is(error_details_pb2.RetryInfo.DESCRIPTOR)


def test_interrupted_stream_status_says_how_much_was_sent() -> None:
    status = to_rpc_status(StreamInterruptedError("modal", ProviderUnavailableError("modal", "reset"), 7))
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "STREAM_INTERRUPTED"
    assert info.metadata["deltas_sent"] == "7" and info.metadata["provider"] == "modal"
    assert info.metadata["cause"] == "PROVIDER_UNAVAILABLE"


def test_config_defaults_match_the_design() -> None:
    s = Settings.from_env({})
    assert s.modal_model == "Qwen/Qwen2.5-7B-Instruct" and s.max_concurrent_requests == 32
    assert s.health_check_interval_s == 60 and s.modal_scaledown_window_minutes == 5
    assert s.grpc_listen_address == "127.0.0.1:50051"


def test_config_parses_values() -> None:
    s = Settings.from_env(
        {
            "MAX_CONCURRENT_REQUESTS": "8",
            "PROVIDER_ORDER": "anthropic, local",
            "LOG_CONTENT": "yes",
            "TTFT_TIMEOUT_S": "2.5",
        }
    )
    assert s.max_concurrent_requests == 8 and s.provider_order == ("anthropic", "local")
    assert s.log_content is True and s.ttft_timeout_s == 2.5


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"MAX_CONCURRENT_REQUESTS": "lots"}, "MAX_CONCURRENT_REQUESTS='lots': Input should be a valid integer"),
        ({"MAX_CONCURRENT_REQUESTS": "0"}, "MAX_CONCURRENT_REQUESTS='0': Input should be greater than 0"),
        ({"TTFT_TIMEOUT_S": "soon"}, "TTFT_TIMEOUT_S='soon': Input should be a valid number"),
        ({"LOG_CONTENT": "maybe"}, "LOG_CONTENT='maybe': Input should be a valid boolean"),
        ({"PROVIDER_ORDER": "modal,openai"}, "PROVIDER_ORDER='openai': unknown provider"),
        ({"COLD_START_POLICY": "pray"}, "COLD_START_POLICY='pray': Input should be 'fallback' or 'wait'"),
        ({"GRPC_LISTEN_ADDRESS": "50051"}, "GRPC_LISTEN_ADDRESS='50051': must be host:port"),
        ({"TLS_CERT_FILE": "a.pem"}, "TLS_CERT_FILE and TLS_KEY_FILE must be set together"),
        ({"DEFAULT_MAX_TOKENS": "5000"}, "DEFAULT_MAX_TOKENS (5000) exceeds MAX_TOKENS_CAP"),
    ],
)
def test_bad_config_names_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert needle in str(info.value)


def test_upstream_400_names_the_field() -> None:
    long_ctx = InvalidRequestError.upstream("modal", "This model's maximum context length is 4096 tokens.")
    assert [(v.field, v.description) for v in long_ctx.violations] == [
        ("messages", "This model's maximum context length is 4096 tokens.")
    ]
    assert InvalidRequestError.upstream("vastai", "temperature must be <= 2").violations[0].field == "temperature"
    assert InvalidRequestError.upstream("vastai", "bad json").violations[0].field == "request"
