"""Helpers for routing tests: a gateway over real fake upstreams, and one call shape for both RPCs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from tests.conftest import make_settings

MODAL_MODEL = "Qwen/Qwen2.5-7B-Instruct"
MESSAGES = [pb.Message(role=pb.ROLE_SYSTEM, content="be brief"), pb.Message(role=pb.ROLE_USER, content="hello there")]


def chain_settings(modal: Any = None, vast: Any = None, anthropic: Any = None, **overrides: Any) -> Any:
    """Settings for a chain of fakes with short, test-sized timeouts."""
    values: dict[str, Any] = {
        "retry_initial_delay_s": 0.01,
        "retry_max_delay_s": 0.02,
        "ttft_timeout_s": 1.5,
        "stream_idle_timeout_s": 0.5,
        "request_timeout_s": 2.0,
        "wake_poll_interval_s": 0.1,
        "min_attempt_time_s": 0.05,
        "health_check_timeout_s": 5.0,
        "connect_timeout_s": 1.0,
    }
    if modal is not None:
        # These tests start from a Modal stand-in that was asked at startup (its /health wakes
        # nothing); the real default without a Modal API token is not to ask (see test_modal_provider).
        values |= {"modal_web_url": modal.base_url, "modal_model": MODAL_MODEL, "modal_validate_on_start": "probe"}
    if vast is not None:
        values |= {"vastai_vllm_url": vast.base_url, "vastai_model": MODAL_MODEL}
    if anthropic is not None:
        values |= {
            "anthropic_api_key": "sk-ant-test",
            "anthropic_base_url": anthropic.base_url,
            "anthropic_model": "claude-test",
        }
    values |= overrides
    return make_settings(**values)


@dataclass
class Outcome:
    """What the caller saw, for either RPC."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    text: str = ""
    deltas: list[str] = field(default_factory=list)
    provider: str = ""
    attempts: list[tuple[str, str]] = field(default_factory=list)
    finish_reason: int = 0
    usage: Any = None
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    details: str = ""
    retry_delay_s: float | None = None
    violations: dict[str, str] = field(default_factory=dict)
    finals: int = 0


def _error(outcome: Outcome, exc: grpc.aio.AioRpcError) -> Outcome:
    outcome.code = exc.code()
    outcome.details = exc.details() or ""
    status = rpc_status.from_call(exc)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            outcome.reason, outcome.metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            outcome.retry_delay_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            outcome.violations = {v.field: v.description for v in bad.field_violations}
    return outcome


async def call(stub: pb_grpc.InferenceServiceStub, rpc: str, timeout: float = 10, **fields: Any) -> Outcome:  # noqa: ASYNC109
    """Runs Chat or ChatStream and records what the caller saw."""
    fields.setdefault("messages", MESSAGES)
    outcome = Outcome()
    try:
        if rpc == "Chat":
            r = await stub.Chat(pb.ChatRequest(**fields), timeout=timeout)
            outcome.text, outcome.provider = r.message.content, r.provider
            outcome.attempts = [(a.provider, a.error_reason) for a in r.attempts]
            outcome.finish_reason, outcome.usage = r.finish_reason, r.usage
            return outcome
        async for m in stub.ChatStream(pb.ChatStreamRequest(**fields), timeout=timeout):
            if m.HasField("delta"):
                outcome.deltas.append(m.delta.text)
            else:
                outcome.finals += 1
                f = m.final
                outcome.provider, outcome.finish_reason, outcome.usage = f.provider, f.finish_reason, f.usage
                outcome.attempts = [(a.provider, a.error_reason) for a in f.attempts]
        outcome.text = "".join(outcome.deltas)
        return outcome
    except grpc.aio.AioRpcError as exc:
        outcome.text = "".join(outcome.deltas)
        return _error(outcome, exc)
