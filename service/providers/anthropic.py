"""Anthropic Messages API through the official SDK (``AsyncAnthropic``).

How it differs from plain OpenAI:

* ``system`` is a top-level parameter, not a message: every system message is moved there.
* Roles must alternate and the conversation must open with a user turn: consecutive same-role
  messages are merged, and a conversation that opens with the assistant gets a short user turn
  in front. A trailing assistant message is kept: Anthropic continues it (prefill).
* ``max_tokens`` is required (the servicer always sets it).
* Stop reasons are ``end_turn``/``stop_sequence``/``max_tokens``/``tool_use``/``refusal``/
  ``pause_turn``; usage is ``input_tokens``/``output_tokens``.
* Streaming is typed events (message_start, content_block_delta with text_delta, message_delta
  with the stop reason and output tokens, message_stop); a stream without message_stop failed.
* 529 ``overloaded_error`` is Anthropic's "busy, retry": retryable like 429 and 5xx.
* The SDK's own retries are off (the router retries and falls back) and its own spans are off
  (the router's attempt span is the one CLIENT span per attempt, so nothing is duplicated).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import anthropic
import httpx2  # the SDK's HTTP client (a fork of httpx); mid-stream transport errors surface raw

from service.config import Settings
from service.errors import (
    InvalidRequestError,
    ProviderAuthError,
    ProviderError,
    ProviderModelNotFoundError,
    ProviderProtocolError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from service.providers.base import (
    ChatMessage,
    ChatRequest,
    ChatResult,
    FinishReason,
    HealthReport,
    StreamEnd,
    StreamItem,
    Usage,
    retry_after_s,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
# Anthropic requires the first turn to be the user's; this stands in when the caller's is not.
LEADING_USER_TURN = "(continuing the conversation below)"

_STOP = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}


def to_anthropic(messages: tuple[ChatMessage, ...]) -> tuple[str | None, list[dict[str, str]]]:
    """Splits out the system prompt and makes roles alternate, starting with the user."""
    system = "\n\n".join(m.content for m in messages if m.role == "system") or None
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.role == "system":
            continue
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] += "\n\n" + m.content
        else:
            turns.append({"role": m.role, "content": m.content})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": LEADING_USER_TURN})
    return system, turns


def finish_reason(stop_reason: str | None) -> FinishReason:
    """Maps Anthropic's stop_reason to :class:`FinishReason`."""
    return _STOP.get(stop_reason or "", FinishReason.UNSPECIFIED)


class AnthropicProvider:
    """Anthropic as the last resort of the chain."""

    kind = "anthropic"
    scale_to_zero = False

    def __init__(self, settings: Settings, name: str = "anthropic") -> None:
        self.name = name
        self.default_model = settings.anthropic_model
        self.endpoint = (settings.anthropic_base_url or DEFAULT_BASE_URL).rstrip("/")
        self._settings = settings
        self._client: anthropic.AsyncAnthropic | None = None

    async def start(self) -> None:
        """Creates the SDK client (pooled; one per provider)."""
        s = self._settings
        self._client = anthropic.AsyncAnthropic(
            api_key=s.anthropic_api_key,
            base_url=s.anthropic_base_url or None,
            timeout=anthropic.Timeout(s.request_timeout_s, connect=s.connect_timeout_s),
            max_retries=0,
            open_telemetry=False,
        )

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        """The SDK client; ``start()`` must have run."""
        if self._client is None:
            raise RuntimeError("anthropic provider used before start()")
        return self._client

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        system, turns = to_anthropic(request.messages)
        params: dict[str, Any] = {
            "model": request.model or self.default_model,
            "max_tokens": request.max_tokens,
            "messages": turns,
        }
        if system:
            params["system"] = system
        if request.temperature is not None:
            # Anthropic's range is [0, 1]; the gateway accepts OpenAI's [0, 2].
            params["temperature"] = min(request.temperature, 1.0)
        if request.top_p is not None:
            params["top_p"] = request.top_p
        if request.stop:
            params["stop_sequences"] = list(request.stop)
        return params

    def _translate(self, exc: Exception, model: str) -> ProviderError | InvalidRequestError:
        """The one place SDK exceptions become domain errors."""
        if isinstance(exc, httpx2.TimeoutException):
            return ProviderTimeoutError(self.name, f"anthropic stream timed out: {type(exc).__name__}")
        if isinstance(exc, httpx2.TransportError):
            return ProviderUnavailableError(self.name, f"anthropic connection failed: {type(exc).__name__}: {exc}")
        if isinstance(exc, anthropic.APITimeoutError):
            return ProviderTimeoutError(self.name, f"anthropic timed out: {exc}")
        if isinstance(exc, anthropic.APIConnectionError):
            return ProviderUnavailableError(self.name, f"anthropic ({self.endpoint}) unreachable: {exc}")
        if isinstance(exc, anthropic.APIStatusError):
            status = exc.status_code
            text = _message_of(exc)
            if status == 200:  # an `event: error` inside a stream that had started fine
                kind = _error_type(exc)
                if kind in _RETRYABLE_STREAM_ERRORS:
                    return ProviderUnavailableError(self.name, f"anthropic failed mid-stream: {text}")
                return ProviderProtocolError(self.name, f"anthropic failed mid-stream: {text}")
            if status in (400, 413, 422):
                return InvalidRequestError.upstream("anthropic", text)
            if status in (401, 403):
                return ProviderAuthError(
                    self.name, f"anthropic refused the credentials ({text}); check ANTHROPIC_API_KEY"
                )
            if status == 404:
                return ProviderModelNotFoundError(
                    self.name,
                    f"ANTHROPIC_MODEL={model!r} is not available from anthropic ({text})"
                    if model == self.default_model
                    else f"anthropic does not serve model {model!r} ({text})",
                    model=model,
                    served=[],
                )
            if status in (408, 429, 529) or status >= 500:
                return ProviderUnavailableError(
                    self.name,
                    f"anthropic answered {status}: {text}",
                    retry_after_s=retry_after_s(exc.response.headers.get("retry-after")),
                )
            return ProviderError(self.name, f"anthropic answered {status}: {text}")
        if isinstance(exc, anthropic.APIError):
            return ProviderProtocolError(self.name, f"anthropic stream failed: {exc}")
        return ProviderError(self.name, f"anthropic failed: {type(exc).__name__}: {exc}")

    async def chat(self, request: ChatRequest) -> ChatResult:
        """One unary message."""
        params = self._params(request)
        try:
            message = await self.client.messages.create(**params)
        except anthropic.AnthropicError as exc:
            raise self._translate(exc, params["model"]) from exc
        text = "".join(getattr(block, "text", "") for block in message.content)
        return ChatResult(
            id=message.id,
            model=message.model,
            content=text,
            finish_reason=finish_reason(message.stop_reason),
            usage=Usage(message.usage.input_tokens, message.usage.output_tokens),
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        """Streams text deltas; the SDK stream (and its HTTP response) is closed in ``finally``."""
        params = self._params(request)
        try:
            events = await self.client.messages.create(**params, stream=True)
        except anthropic.AnthropicError as exc:
            raise self._translate(exc, params["model"]) from exc
        msg_id, model, stop = "", params["model"], None
        input_tokens = output_tokens = 0
        stopped = False
        try:
            async for event in events:
                kind = event.type
                if kind == "content_block_delta":
                    text = getattr(event.delta, "text", None)
                    if text:
                        yield text
                elif kind == "message_start":
                    msg_id, model = event.message.id, event.message.model
                    input_tokens = event.message.usage.input_tokens
                elif kind == "message_delta":
                    stop = event.delta.stop_reason
                    output_tokens = event.usage.output_tokens
                elif kind == "message_stop":
                    stopped = True
                    break
            if not stopped:
                raise ProviderProtocolError(self.name, "anthropic ended the stream without message_stop")
            if stop is None:
                raise ProviderProtocolError(self.name, "anthropic ended the stream without a stop reason")
            yield StreamEnd(msg_id, model, finish_reason(stop), Usage(input_tokens, output_tokens))
        except (anthropic.AnthropicError, httpx2.TransportError) as exc:
            raise self._translate(exc, params["model"]) from exc
        finally:
            await events.close()

    async def check_health(self, timeout_s: float) -> HealthReport:
        """Looks up the configured model (validates key and model; generates nothing)."""
        start = time.perf_counter()
        try:
            await self.client.models.retrieve(self.default_model, timeout=timeout_s)
        except anthropic.AnthropicError as exc:
            err = self._translate(exc, self.default_model)
            return HealthReport(False, time.perf_counter() - start, error=err.message)
        return HealthReport(True, time.perf_counter() - start, [self.default_model])

    async def aclose(self) -> None:
        """Closes the SDK's HTTP pool."""
        if self._client is not None:
            await self._client.close()
            self._client = None


_RETRYABLE_STREAM_ERRORS = {"overloaded_error", "api_error", "rate_limit_error"}


def _error_type(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("type", ""))
    return ""


def _message_of(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return f"{err.get('type', 'error')}: {err['message']}"
    return str(exc.message)[:300]
