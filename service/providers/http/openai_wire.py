"""The OpenAI/vLLM wire format, without I/O: request bodies, SSE decoding, completions, and the one
table from HTTP answers to domain errors. Pure functions, so every rule is unit-tested directly."""

from __future__ import annotations

from typing import Any

import orjson

from service.errors import (
    GatewayError,
    InvalidRequestError,
    ProviderAuthError,
    ProviderError,
    ProviderModelNotFoundError,
    ProviderProtocolError,
    ProviderUnavailableError,
)
from service.providers.base import (
    ChatRequest,
    ChatResult,
    StreamEnd,
    Usage,
    finish_reason_from_openai,
    retry_after_s,
)

CHAT_PATH = "/v1/chat/completions"


def request_body(request: ChatRequest, default_model: str, stream: bool) -> dict[str, Any]:
    """The JSON body of a chat completion request."""
    body: dict[str, Any] = {
        "model": request.model or default_model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "max_tokens": request.max_tokens,
    }
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def error_text(body: bytes) -> str:
    """The human part of an error body (vLLM and OpenAI nest it under ``error.message``)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace")
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(data)[:300]


def error_for_status(
    provider: str,
    endpoint: str,
    status: int,
    body: bytes,
    retry_after: str | None,
    *,
    model: str,
    default_model: str,
    model_env_var: str,
    served: list[str],
) -> GatewayError:
    """Translates a non-200 answer into the error tree: the one place for HTTP status codes."""
    text = error_text(body)
    where = f"{provider} ({endpoint}) answered {status}"
    if status == 404:
        hint = f" Set {model_env_var} to one of them." if model_env_var else ""
        named = f"{model_env_var}={model!r}" if model_env_var and model == default_model else f"model {model!r}"
        return ProviderModelNotFoundError(
            provider,
            f"{named} is not served by {provider} ({endpoint}); it serves {served}.{hint}",
            model=model,
            served=served,
        )
    if status in (401, 403):
        return ProviderAuthError(
            provider, f"{where}: credentials refused ({text}); check the provider's API key or proxy token"
        )
    if status in (400, 413, 422):
        return InvalidRequestError.upstream(provider, text)
    if status in (408, 429) or status >= 500:
        return ProviderUnavailableError(provider, f"{where}: {text}", retry_after_s=retry_after_s(retry_after))
    return ProviderError(provider, f"{where}: {text}")


def parse_completion(provider: str, body: bytes, requested_model: str) -> ChatResult:
    """A unary ``chat.completion``; an answer without a finish reason is incomplete, not short."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProviderProtocolError(provider, f"{provider} sent a body that is not JSON") from exc
    if not isinstance(data, dict):
        raise ProviderProtocolError(provider, f"{provider} sent an unexpected completion shape")
    if "error" in data and "choices" not in data:
        raise ProviderProtocolError(provider, f"{provider} returned an error: {error_text(body)}")
    try:
        choice = data["choices"][0]
        if not choice.get("finish_reason"):
            raise ProviderProtocolError(provider, f"{provider} answered without a finish reason (incomplete)")
        usage = data.get("usage") or {}
        return ChatResult(
            id=str(data.get("id", "")),
            model=str(data.get("model") or requested_model),
            content=choice["message"].get("content") or "",
            finish_reason=finish_reason_from_openai(choice.get("finish_reason")),
            usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ProviderProtocolError(provider, f"{provider} sent an unexpected completion shape: {exc!r}") from exc


class SSEDecoder:
    """Incremental decoder of an OpenAI-style SSE stream into text deltas and one end.

    ``feed(bytes)`` returns the deltas completed by those bytes; ``done`` turns true on
    ``data: [DONE]``; ``end()`` returns the :class:`StreamEnd` or raises when the stream broke
    the protocol (no finish reason). An in-band error (``data: {"error": ...}``) or malformed data
    becomes ``error`` (a :class:`ProviderProtocolError`) after the deltas that preceded it in the
    same read are returned, so the outcome depends on the upstream's events, not on how TCP
    happened to segment them; the caller raises ``error`` once it has passed those deltas on.
    """

    __slots__ = ("_buffer", "done", "error", "finish", "id", "model", "provider", "usage")

    def __init__(self, provider: str, requested_model: str) -> None:
        self.provider = provider
        self._buffer = b""
        self.done = False
        self.finish: str | None = None
        self.id = ""
        self.model = requested_model
        self.usage = Usage()
        self.error: ProviderProtocolError | None = None

    def feed(self, data: bytes) -> list[str]:
        """Consumes bytes; returns the text deltas they complete (see ``error``)."""
        if self.error is not None:
            raise self.error
        buffer = self._buffer + data if self._buffer else data
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        deltas: list[str] = []
        # The hot loop of every stream: one slice compare and one orjson call per event; JSON
        # allows the space after "data:" and a trailing CR, so nothing is stripped on the way.
        for line in lines:
            if line[:5] != b"data:":
                continue  # blank separator, comment, event: or id: line
            try:
                chunk = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                payload = line[5:].strip()
                if payload == b"[DONE]":  # the one non-JSON payload, once per stream
                    self.done = True
                else:
                    self.error = ProviderProtocolError(
                        self.provider, f"{self.provider} sent malformed SSE data: {payload[:80]!r}"
                    )
                break
            if type(chunk) is not dict:
                self.error = ProviderProtocolError(
                    self.provider, f"{self.provider} sent SSE data that is not a JSON object: {line[5:85]!r}"
                )
                break
            if "error" in chunk:
                self.error = ProviderProtocolError(
                    self.provider, f"{self.provider} reported an error mid-stream: {error_text(line[5:])}"
                )
                break
            try:
                choices = chunk.get("choices")
                if choices:
                    choice = choices[0]
                    delta = choice.get("delta")
                    if delta:
                        text = delta.get("content")
                        if text:
                            deltas.append(text)
                    reason = choice.get("finish_reason")
                    if reason:
                        self.finish = reason
                usage = chunk.get("usage")
                if usage:
                    self.usage = Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
                if not self.id:
                    self.id = chunk.get("id", "")
                    self.model = chunk.get("model") or self.model
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                self.error = ProviderProtocolError(
                    self.provider, f"{self.provider} sent an unexpected chunk shape ({exc!r}): {line[5:85]!r}"
                )
                break
        if self.error is not None and not deltas:
            raise self.error
        return deltas

    def end(self) -> StreamEnd:
        """The final item, once the body has ended."""
        if self.error is not None:
            raise self.error
        if self.finish is None:
            raise ProviderProtocolError(
                self.provider,
                f"{self.provider} ended the stream without a finish reason"
                + (" ([DONE] received)" if self.done else " (connection closed early)"),
            )
        return StreamEnd(self.id, self.model, finish_reason_from_openai(self.finish), self.usage)


def served_model_ids(body: bytes) -> list[str]:
    """Model ids from a ``GET /v1/models`` body."""
    data = orjson.loads(body)
    return [str(m["id"]) for m in data.get("data", [])]
