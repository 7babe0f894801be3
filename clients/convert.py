"""Protobuf messages to the library's plain types (callers never hold a protobuf message)."""

from __future__ import annotations

from collections.abc import Sequence

from inference.v1 import inference_pb2 as pb

from clients.types import Attempt, ChatResult, Health, ProviderHealth, Usage


def usage(u: pb.Usage) -> Usage:
    """Token counts."""
    return Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)


def attempts(items: Sequence[pb.Attempt]) -> list[Attempt]:
    """Every provider try of a call."""
    return [Attempt(a.provider, a.error_reason, a.error_message, a.duration.ToNanoseconds() / 1e9) for a in items]


def finish_reason(value: int) -> str:
    """``FINISH_REASON_STOP`` -> ``stop``."""
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def chat_result(r: pb.ChatResponse) -> ChatResult:
    """A unary answer."""
    return ChatResult(
        r.id,
        r.model,
        r.message.content,
        finish_reason(r.finish_reason),
        usage(r.usage),
        r.provider,
        attempts(r.attempts),
    )


def stream_result(f: pb.ChatStreamFinal, text: str) -> ChatResult:
    """A stream's last message plus the text its deltas carried."""
    return ChatResult(
        f.id, f.model, text, finish_reason(f.finish_reason), usage(f.usage), f.provider, attempts(f.attempts)
    )


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
