"""The provider protocol and the domain types every provider speaks.

A provider turns a :class:`ChatRequest` into either a :class:`ChatResult` (unary) or an async
stream of text deltas (``str``) ending with one :class:`StreamEnd`. Providers know nothing of gRPC;
they raise only :mod:`service.errors` types. Adding a provider is one file plus one line in
:mod:`service.providers.registry`.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]


class FinishReason(enum.Enum):
    """Why generation stopped, normalised across providers."""

    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    ABORT = "abort"


_OPENAI_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
    "abort": FinishReason.ABORT,
}


def finish_reason_from_openai(value: str | None) -> FinishReason:
    """Maps an OpenAI/vLLM ``finish_reason`` string to :class:`FinishReason`."""
    if value is None:
        return FinishReason.UNSPECIFIED
    return _OPENAI_FINISH.get(value, FinishReason.UNSPECIFIED)


# A Retry-After beyond this is not advice a call can follow (a misconfigured or hostile upstream).
RETRY_AFTER_ABSURD_S = 86_400.0


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 10.2.3).

    ``nan``, infinities, negative numbers and values over a day are ignored (None); a date in the
    past means "now" (0). ``now`` (epoch seconds) is for tests.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT
            when = when.replace(tzinfo=datetime.UTC)
        seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    if not math.isfinite(seconds) or seconds < 0 or seconds > RETRY_AFTER_ABSURD_S:
        return None
    return seconds


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One conversation turn."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat request.

    Attributes:
        messages: The conversation, oldest first.
        model: The model to ask for; ``None`` means the provider's configured default.
        max_tokens: Upper bound on generated tokens (always set: the servicer fills the default).
    """

    messages: tuple[ChatMessage, ...]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one completion."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """prompt + completion."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A complete answer from one provider."""

    id: str
    model: str
    content: str
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a provider stream: everything but the text."""

    id: str
    model: str
    finish_reason: FinishReason
    usage: Usage


StreamItem = str | StreamEnd


@dataclass(slots=True)
class HealthReport:
    """The outcome of one health probe.

    Attributes:
        ok: The endpoint answered healthy.
        latency_s: How long the probe took.
        served_models: Model ids the endpoint reports, if it reports any.
        error: Why the probe failed; empty when ``ok``.
        reachable: A server answered at all (a replica is up), even if it is not ``ok``: a model
            mismatch or refused credentials are not cured by waiting for a cold start.
    """

    ok: bool
    latency_s: float
    served_models: list[str] = field(default_factory=list)
    error: str = ""
    reachable: bool | None = None

    def __post_init__(self) -> None:
        if self.reachable is None:
            self.reachable = self.ok


@runtime_checkable
class Provider(Protocol):
    """What the router needs from an upstream.

    Attributes:
        name: The provider's name in the chain (``modal``, ``vastai``, ``anthropic``, ``local``).
        kind: The kind of upstream (``vllm``, ``anthropic``, ``llama.cpp``).
        endpoint: Base URL without credentials, for Health and traces.
        default_model: The model used when a request names none.
        scale_to_zero: The upstream stops when idle and cold-starts on demand (Modal).
    """

    name: str
    kind: str
    endpoint: str
    default_model: str
    scale_to_zero: bool

    async def start(self) -> None:
        """Prepares the provider (pools, subprocesses); called once before traffic."""

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Returns one complete answer or raises a :class:`service.errors.ProviderError`."""

    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        """Yields text deltas, then exactly one :class:`StreamEnd`.

        Implemented as an async generator whose ``finally`` closes the upstream request, so that
        ``aclose()`` (the caller cancelled, or the router gave up) stops generation upstream.
        """

    async def check_health(self, timeout_s: float) -> HealthReport:
        """Probes the upstream without generating tokens."""

    async def aclose(self) -> None:
        """Releases pools and subprocesses."""
