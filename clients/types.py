"""Plain result types of the client library (no protobuf in callers' hands)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Attempt:
    """One provider try; ``error_reason`` is empty for the one that served."""

    provider: str
    error_reason: str
    error_message: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A complete answer."""

    id: str
    model: str
    text: str
    finish_reason: str
    usage: Usage
    provider: str
    attempts: list[Attempt] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """One provider's state as the service sees it."""

    name: str
    kind: str
    endpoint: str
    model: str
    state: str
    circuit_state: str
    warmth: str
    last_error: str
    last_latency_s: float | None


@dataclass(frozen=True, slots=True)
class Health:
    """The service's health."""

    status: str
    providers: list[ProviderHealth]
