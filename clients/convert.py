"""Protobuf messages to the library's plain types (callers never hold a protobuf message)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from inference.v1 import inference_pb2 as pb

from clients.types import (
    Attempt,
    CatalogModel,
    ChatResult,
    Health,
    ModelRoute,
    ProviderHealth,
    ToolCall,
    ToolCallDelta,
    Usage,
)

Parser = Callable[[str], Any] | None


def usage(u: pb.Usage) -> Usage:
    """Token counts."""
    return Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)


def attempts(items: Sequence[pb.Attempt]) -> list[Attempt]:
    """Every provider try of a call."""
    return [Attempt(a.provider, a.error_reason, a.error_message, a.duration.ToNanoseconds() / 1e9) for a in items]


def finish_reason(value: int) -> str:
    """``FINISH_REASON_STOP`` -> ``stop``."""
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def tool_calls(items: Sequence[pb.ToolCall]) -> list[ToolCall]:
    """An answer's tool calls."""
    return [ToolCall(c.id, c.name, c.arguments) for c in items]


def tool_call_delta(d: pb.ToolCallDelta) -> ToolCallDelta:
    """One streamed tool-call fragment."""
    return ToolCallDelta(d.index, d.id, d.name, d.arguments)


def assemble(deltas: Sequence[ToolCallDelta]) -> list[ToolCall]:
    """The calls the fragments so far make up, by index (arguments possibly still incomplete)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, ["", "", ""])
        call[0], call[1] = call[0] or d.id, call[1] or d.name
        call[2] += d.arguments
    return [ToolCall(i, n, a) for _, (i, n, a) in sorted(calls.items())]


def chat_result(r: pb.ChatResponse, parse: Parser = None) -> ChatResult:
    """A unary answer; ``parse`` decodes structured output for ``.parsed``."""
    return ChatResult(
        r.id,
        r.model,
        r.message.content,
        finish_reason(r.finish_reason),
        usage(r.usage),
        r.provider,
        attempts(r.attempts),
        tool_calls(r.message.tool_calls),
        parse,
    )


def stream_result(f: pb.ChatStreamFinal, text: str, parse: Parser = None) -> ChatResult:
    """A stream's last message: the text its deltas carried, the calls the gateway assembled."""
    return ChatResult(
        f.id,
        f.model,
        text,
        finish_reason(f.finish_reason),
        usage(f.usage),
        f.provider,
        attempts(f.attempts),
        tool_calls(f.message.tool_calls),
        parse,
    )


def catalogue(r: pb.ListModelsResponse) -> list[CatalogModel]:
    """The model catalogue, the default name first."""
    return [CatalogModel(m.name, [ModelRoute(x.provider, x.model) for x in m.routes]) for m in r.models]


def health(r: pb.HealthResponse) -> Health:
    """The service's health and every provider's state."""
    return Health(
        status=pb.ServingStatus.Name(r.status).removeprefix("SERVING_STATUS_"),
        providers=[
            ProviderHealth(
                p.name,
                p.kind,
                p.endpoint,
                p.model,
                pb.ProviderState.Name(p.state).removeprefix("PROVIDER_STATE_"),
                pb.CircuitState.Name(p.circuit_state).removeprefix("CIRCUIT_STATE_"),
                pb.Warmth.Name(p.warmth).removeprefix("WARMTH_"),
                p.last_error,
                p.last_latency.ToNanoseconds() / 1e9 if p.HasField("last_latency") else None,
            )
            for p in r.providers
        ],
    )
