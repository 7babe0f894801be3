"""The provider protocol and the domain types every provider speaks.

A provider turns a :class:`ChatRequest` into an async stream of text deltas (``str``) and tool-call
fragments (:class:`ToolCallDelta`) ending with one :class:`StreamEnd`; both RPCs are served from it
(the router assembles unary answers). Providers know nothing of gRPC;
they raise only :mod:`service.errors` types. Adding a provider is one file plus one line in
:mod:`service.providers.registry`.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import math
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant", "tool"]


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


# Set by the router around the wait for an attempt's first item. The HTTP layer calls it with True
# when it must queue for a free pooled connection and with False once it has one: the first-token
# timer stops while we queue for our own pool and starts again then, so that time is never booked
# as the provider's slowness.
connection_wait: ContextVar[Callable[[bool], None] | None] = ContextVar("connection_wait", default=None)


@dataclass(frozen=True, slots=True)
class TextPart:
    """A text part of a message."""

    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image part of a message: an ``https:`` URL or a ``data:image/...;base64,`` URL."""

    url: str

    @property
    def is_data_url(self) -> bool:
        """The image travels inline (base64) rather than by reference."""
        return self.url.startswith("data:")

    def data(self) -> tuple[str, str]:
        """(media type, base64 payload) of a data URL (``data:image/png;base64,AAAA``)."""
        head, _, payload = self.url.partition(",")
        return head.removeprefix("data:").split(";")[0], payload


ContentPart = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made to one of the caller's tools.

    Attributes:
        id: The call's id; a ``tool`` message answers it by this id.
        name: The tool's name.
        arguments: The arguments as JSON text (an object; ``{}`` when the model sent none).
    """

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A streamed fragment of a tool call.

    ``index`` numbers the tool calls of one answer from 0 (text blocks never count); ``id`` and
    ``name`` come on the first fragment of a call, ``arguments`` fragments concatenate to its JSON.
    """

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One conversation turn.

    Attributes:
        role: Who speaks; ``tool`` carries a tool's result for ``tool_call_id``.
        content: The text (may be empty when ``parts`` or ``tool_calls`` is set).
        tool_calls: ``assistant`` turns: the calls the model made.
        tool_call_id: ``tool`` turns: the call this result answers.
        parts: Text and image parts, instead of ``content``.
    """

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    parts: tuple[ContentPart, ...] = ()

    @property
    def has_images(self) -> bool:
        """The message carries at least one image."""
        return any(isinstance(p, ImagePart) for p in self.parts)

    def text(self) -> str:
        """``content``, or the text parts joined (images left out)."""
        if not self.parts:
            return self.content
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool the model may call.

    Attributes:
        name: The function name.
        description: What it does, for the model.
        parameters: Its arguments as a JSON Schema object (integral numbers are ints).
        strict: Ask the provider to make arguments fit the schema exactly, where supported.
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """How the model may use the tools: ``mode`` auto/none/required, or one ``function`` by name."""

    mode: Literal["auto", "none", "required"] | None = None
    function: str = ""


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: any JSON object, or JSON that fits ``schema``.

    Attributes:
        type: ``json_object`` or ``json_schema``.
        name: The schema's name (``json_schema``).
        schema: The JSON Schema the answer must fit (``json_schema``).
        strict: Ask the provider to enforce the schema exactly, where supported.
    """

    type: Literal["json_object", "json_schema"]
    name: str = ""
    schema: Mapping[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat request.

    Attributes:
        messages: The conversation, oldest first.
        model: The model to ask for; ``None`` means the provider's configured default. The router
            resolves catalogue names, so a provider always sees its own model id here.
        max_tokens: Upper bound on generated tokens (always set: the servicer fills the default).
        tools: Tools the model may call.
        tool_choice: How it may call them (None: the provider's default, ``auto`` with tools).
        response_format: Structured output, validated by the gateway before the caller sees it.
        metadata: The caller's tags (kept with the call's record; never sent upstream).
    """

    messages: tuple[ChatMessage, ...]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def has_images(self) -> bool:
        """Some message carries an image."""
        return any(m.has_images for m in self.messages)


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
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a provider stream: everything but the text."""

    id: str
    model: str
    finish_reason: FinishReason
    usage: Usage


StreamItem = str | ToolCallDelta | StreamEnd


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
        image_input: The upstream takes image parts (the embedded model does not: it is skipped
            for requests with images).
    """

    name: str
    kind: str
    endpoint: str
    default_model: str
    scale_to_zero: bool
    image_input: bool

    async def start(self) -> None:
        """Prepares the provider (pools, subprocesses); called once before traffic."""

    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        """Yields text deltas and tool-call fragments as they arrive, then exactly one :class:`StreamEnd`.

        Implemented as an async generator whose ``finally`` closes the upstream request, so that
        ``aclose()`` (the caller cancelled, or the router gave up) stops generation upstream.
        """

    async def check_health(self, timeout_s: float) -> HealthReport:
        """Probes the upstream without generating tokens."""

    async def aclose(self) -> None:
        """Releases pools and subprocesses."""
