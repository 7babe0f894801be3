"""Anthropic Messages API through the official SDK (``AsyncAnthropic``).

What is sent and how answers are read is in :mod:`service.providers.anthropic_messages` (roles,
tools, tool results, images, structured output: which models get the native ``output_config``
and which a forced tool call). How it differs from plain OpenAI, in short:

* ``system`` is top-level; roles alternate and open with the user; ``max_tokens`` is required
  (the servicer always sets it).
* Requests the gateway accepts but Anthropic would answer 400 are adjusted, each adjustment
  recorded as a ``request_adjusted`` event on the attempt span (see
  :func:`~service.providers.anthropic_messages.translate`): ``temperature`` with ``top_p`` (only
  ``temperature`` is sent), ``temperature`` above 1 (clamped: Anthropic's range is 0..1),
  whitespace-only stop sequences (dropped), a final assistant turn (prefill) ending in whitespace
  (trimmed), tool history the API would refuse (unanswered calls, stray results, foreign call
  ids, tool blocks without ``tools``), ``strict`` tools on models without strict tool use.
* Stop reasons are ``end_turn``/``stop_sequence``/``max_tokens``/``tool_use``/``refusal``/
  ``pause_turn``; usage is ``input_tokens``/``output_tokens``.
* Streaming is typed events (message_start, content_block_start/delta/stop with ``text_delta`` or
  ``input_json_delta``, message_delta with the stop reason and output tokens, message_stop); a
  stream without message_stop failed. Both RPCs are served from it (the router assembles unary
  answers); :meth:`AnthropicProvider.chat` reads the unary API the same way.
* 529 ``overloaded_error`` is Anthropic's "busy, retry": retryable like 429 and 5xx.
* The served models come from ``GET /v1/models``, which lists dated ids only
  (``claude-sonnet-4-5-20250929``); the aliases callers use are derived from them (see
  :func:`model_aliases`), and the configured model is resolved with ``GET /v1/models/{id}`` when
  the list does not name it.
* The SDK's own retries are off (the router retries and falls back) and its own spans are off
  (the router's attempt span is the one CLIENT span per attempt, so nothing is duplicated).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Iterable

import anthropic
import httpx2  # the SDK's HTTP client (a fork of httpx); mid-stream transport errors surface raw
from opentelemetry import trace

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
from service.providers.anthropic_messages import (
    LEADING_USER_TURN,
    Adjustment,
    Translated,
    to_anthropic,
    to_params,
    translate,
)
from service.providers.anthropic_structured import (
    StreamDecoder,
    finish_reason,
    native_structured_output,
)
from service.providers.base import (
    ChatRequest,
    HealthReport,
    StreamEnd,
    StreamItem,
    Usage,
    retry_after_s,
)

__all__ = [
    "LEADING_USER_TURN",
    "Adjustment",
    "AnthropicProvider",
    "finish_reason",
    "model_aliases",
    "native_structured_output",
    "served_with_aliases",
    "to_anthropic",
    "to_params",
]

DEFAULT_BASE_URL = "https://api.anthropic.com"


# ``claude-sonnet-4-5-20250929`` -> stem ``claude-sonnet-4-5``, date ``20250929``.
_DATED = re.compile(r"(?P<stem>claude-.+)-(?P<date>\d{8})")


def model_aliases(model_id: str) -> list[str]:
    """The aliases Anthropic resolves to a dated model id (``GET /v1/models`` lists only the ids).

    ``claude-sonnet-4-5-20250929`` -> ``claude-sonnet-4-5``; ``claude-sonnet-4-20250514`` ->
    ``claude-sonnet-4-0``; ``claude-3-7-sonnet-20250219`` -> ``claude-3-7-sonnet-latest``. A
    wrong guess costs little (the model is asked and answers 404, which is not a provider
    failure); a missing alias would make the router skip Anthropic for a model it serves.
    """
    match = _DATED.fullmatch(model_id)
    if match is None:
        return []
    stem = match["stem"]
    if stem.startswith("claude-3"):
        return [f"{stem}-latest"]
    if re.search(r"[a-z]-\d+$", stem):  # a major version alone: claude-sonnet-4
        return [stem, f"{stem}-0"]
    return [stem]


def served_with_aliases(ids: Iterable[str]) -> list[str]:
    """Model ids followed by their aliases, without duplicates, in order."""
    ids = list(ids)
    extra = [alias for model_id in ids for alias in model_aliases(model_id)]
    return list(dict.fromkeys([*ids, *extra]))


class AnthropicProvider:
    """Anthropic as the last resort of the chain."""

    kind = "anthropic"
    scale_to_zero = False
    image_input = True

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

    def _request(self, request: ChatRequest) -> Translated:
        """The SDK arguments; adjustments go on the current span, which is the attempt's span
        while the router awaits ``chat()`` or a stream's first item (where this runs)."""
        translated = translate(request, self.default_model)
        if translated.adjustments:
            span = trace.get_current_span()
            for adj in translated.adjustments:
                span.add_event(
                    "request_adjusted",
                    {"gateway.provider": self.name, "param": adj.param, "action": adj.action, "detail": adj.detail},
                )
        return translated

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

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        """Streams text deltas and tool-call fragments; the SDK stream (and its HTTP response) is
        closed in ``finally``."""
        sent = self._request(request)
        params = sent.params
        try:
            events = await self.client.messages.create(**params, stream=True)
        except anthropic.AnthropicError as exc:
            raise self._translate(exc, params["model"]) from exc
        decoder = StreamDecoder(sent.answer_tool)
        msg_id, model, stop = "", params["model"], None
        input_tokens = output_tokens = 0
        stopped = False
        try:
            async for event in events:
                kind = event.type
                items: list[StreamItem] = []
                if kind == "content_block_delta":
                    items = decoder.block_delta(event.index, event.delta)
                elif kind == "content_block_start":
                    items = decoder.block_start(event.index, event.content_block)
                elif kind == "content_block_stop":
                    items = decoder.block_stop(event.index)
                elif kind == "message_start":
                    msg_id, model = event.message.id, event.message.model
                    input_tokens = event.message.usage.input_tokens
                elif kind == "message_delta":
                    stop = event.delta.stop_reason
                    output_tokens = event.usage.output_tokens
                elif kind == "message_stop":
                    stopped = True
                    break
                for item in items:
                    yield item
            if not stopped:
                raise ProviderProtocolError(self.name, "anthropic ended the stream without message_stop")
            if stop is None:
                raise ProviderProtocolError(self.name, "anthropic ended the stream without a stop reason")
            yield StreamEnd(msg_id, model, decoder.finish(stop), Usage(input_tokens, output_tokens))
        except (anthropic.AnthropicError, httpx2.TransportError) as exc:
            raise self._translate(exc, params["model"]) from exc
        except _MALFORMED as exc:
            # An event whose data is not JSON (the SDK raises json's error raw), lacks a field, or
            # streams arguments for a block that is no tool call.
            raise ProviderProtocolError(self.name, f"anthropic sent a malformed stream event: {exc}") from exc
        finally:
            await events.close()

    async def check_health(self, timeout_s: float) -> HealthReport:
        """Lists the served models (``GET /v1/models``); generates nothing.

        ``served_models`` holds the listed ids and their aliases, plus the configured model once
        ``GET /v1/models/{id}`` resolved it. Refused credentials and an unknown configured model
        are not ok but reachable; a network error or timeout is not ok and not reachable. An
        endpoint without the models API (404/405, e.g. a proxy in ANTHROPIC_BASE_URL) is ok with
        no served models (unknown), so the probe never marks a working Messages API unhealthy.
        """
        start = time.perf_counter()
        model = self.default_model
        served: list[str] = []
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    served = served_with_aliases(
                        [m.id async for m in await self.client.models.list(limit=1000, timeout=timeout_s)]
                    )
                except anthropic.APIStatusError as exc:
                    if exc.status_code not in (404, 405):
                        raise
                    return HealthReport(True, time.perf_counter() - start, reachable=True)
                if model not in served:
                    # An alias the list does not spell out (or a model it omits): resolve it.
                    await self.client.models.retrieve(model, timeout=timeout_s)
                    served.append(model)
        except TimeoutError:
            return HealthReport(False, time.perf_counter() - start, error=f"anthropic sent no models in {timeout_s} s")
        except anthropic.AnthropicError as exc:
            err = self._translate(exc, model)
            error = f"{err.message}; it serves {served}" if isinstance(err, ProviderModelNotFoundError) else err.message
            reachable = isinstance(exc, anthropic.APIStatusError)  # a server answered, even if with an error
            return HealthReport(False, time.perf_counter() - start, served, error=error, reachable=reachable)
        return HealthReport(True, time.perf_counter() - start, served)

    async def aclose(self) -> None:
        """Closes the SDK's HTTP pool."""
        if self._client is not None:
            await self._client.close()
            self._client = None


_RETRYABLE_STREAM_ERRORS = {"overloaded_error", "api_error", "rate_limit_error"}
# What a body or event that is not the documented JSON raises from the SDK's unvalidated parsing.
_MALFORMED = (ValueError, AttributeError, TypeError, KeyError)


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
