"""The OpenAI/vLLM wire format, without I/O: request bodies, SSE decoding and the one table from
HTTP answers to domain errors. Pure functions, so every rule is unit-tested directly.

Agent fields go out in the shape vLLM 0.11 and llama.cpp's server check: ``tools`` as
``{"type": "function", "function": {...}}``, structured output as ``response_format`` (never
``guided_json``: deprecated in vLLM 0.10.2, silently ignored from 0.12), tool results as ``tool``
messages, images as content parts. Streamed tool calls come back as ``delta.tool_calls`` fragments
and leave as :class:`ToolCallDelta` items in the order they arrived.
"""

from __future__ import annotations

import re
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
    ChatMessage,
    ChatRequest,
    ImagePart,
    ResponseFormat,
    StreamEnd,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Usage,
    finish_reason_from_openai,
    retry_after_s,
)

CHAT_PATH = "/v1/chat/completions"

# What follows "data:" on each complete SSE line, CR included; the buffer is searched up to its
# last newline, so the line still arriving is never matched.
_DATA_PAYLOADS = re.compile(rb"^data:(.*)", re.MULTILINE)
_NO_USAGE = Usage()  # until the stream reports some (frozen: one instance serves every decoder)


def _message(m: ChatMessage) -> dict[str, Any]:
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.text()}
    out: dict[str, Any] = {"role": m.role}
    if m.parts:
        out["content"] = [
            {"type": "image_url", "image_url": {"url": p.url}}
            if isinstance(p, ImagePart)
            else {"type": "text", "text": p.text}
            for p in m.parts
        ]
    else:
        # OpenAI's schema: an assistant turn that only calls tools has content null, not "".
        out["content"] = m.content if m.content or not m.tool_calls else None
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    return out


def _tool(t: Tool) -> dict[str, Any]:
    # dict(): orjson serialises dicts, not other Mappings; integral numbers are already ints.
    function: dict[str, Any] = {"name": t.name, "parameters": dict(t.parameters)}
    if t.description:
        function["description"] = t.description
    if t.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.function:
        return {"type": "function", "function": {"name": choice.function}}
    return choice.mode or "auto"


def _response_format(fmt: ResponseFormat) -> dict[str, Any]:
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema = {"name": fmt.name, "schema": dict(fmt.schema or {}), "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": schema}


def request_body(request: ChatRequest, default_model: str, stream: bool) -> dict[str, Any]:
    """The JSON body of a chat completion request."""
    body: dict[str, Any] = {
        "model": request.model or default_model,
        "messages": [_message(m) for m in request.messages],
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
    if request.tools:
        body["tools"] = [_tool(t) for t in request.tools]
    if request.tool_choice is not None and request.tools:  # vLLM refuses tool_choice without tools
        body["tool_choice"] = _tool_choice(request.tool_choice)
    if request.response_format is not None:
        body["response_format"] = _response_format(request.response_format)
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


class SSEDecoder:
    """Incremental decoder of an OpenAI-style SSE stream into deltas and one end.

    ``feed(bytes)`` returns the items completed by those bytes: text (the text of consecutive
    chunks joined, so one read costs one delta downstream) and :class:`ToolCallDelta` fragments, in
    arrival order; ``done`` turns true on ``data: [DONE]``; ``end()`` returns the
    :class:`StreamEnd` or raises when the stream broke the protocol (no finish reason). An in-band
    error (``data: {"error": ...}``) or malformed data becomes ``error`` (a
    :class:`ProviderProtocolError`) after the items that preceded it in the same read are
    returned, so the outcome depends on the upstream's events, not on how TCP happened to segment
    them; the caller raises ``error`` once it has passed those items on.

    Tool calls are renumbered in order of first appearance. An upstream index normally maps to
    itself; a new ``id`` at an index already in use is a new call (servers that number every
    call 0), and a fragment without an index continues the last call unless it brings an ``id``.
    """

    __slots__ = ("_buffer", "_calls", "_count", "_last", "done", "error", "finish", "id", "model", "provider", "usage")

    def __init__(self, provider: str, requested_model: str) -> None:
        self.provider = provider
        self._buffer = b""
        self.done = False
        self.finish: str | None = None
        self.id = ""
        self.model = requested_model
        self.usage = _NO_USAGE
        self.error: ProviderProtocolError | None = None
        self._calls: dict[int, tuple[str, int]] = {}  # upstream index -> (call id, our index)
        self._count = 0  # calls seen so far
        self._last = -1  # the upstream index of the last fragment

    def feed(self, data: bytes) -> list[str | ToolCallDelta]:
        """Consumes bytes; returns the deltas they complete (see ``error``)."""
        if self.error is not None:
            raise self.error
        buffer = self._buffer + data if self._buffer else data
        cut = buffer.rfind(b"\n")
        if cut < 0:
            self._buffer = buffer  # no complete line yet
            return []
        self._buffer = buffer[cut + 1 :]
        items: list[str | ToolCallDelta] = []
        texts: list[str] = []
        # The hot loop of every stream: one orjson call per event. The payloads of the complete
        # data: lines come from one regex scan (blank separators, comments, event: and id: lines
        # never reach Python); JSON allows the space after "data:" and a trailing CR, so nothing
        # is stripped on the way. "[DONE]" is recognised before orjson, whose error for it costs
        # more than a one-byte check on every event (a Python-level JSONDecodeError.__init__);
        # other spacings of it (a CR after it) still take the error path.
        for payload in _DATA_PAYLOADS.findall(buffer, 0, cut):
            if payload[-1:] == b"]" and payload.strip() == b"[DONE]":
                self.done = True
                break
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                stripped = payload.strip()
                if stripped == b"[DONE]":  # with spacing the check above leaves to this path
                    self.done = True
                else:
                    self.error = ProviderProtocolError(
                        self.provider, f"{self.provider} sent malformed SSE data: {stripped[:80]!r}"
                    )
                break
            if type(chunk) is not dict:
                self.error = ProviderProtocolError(
                    self.provider, f"{self.provider} sent SSE data that is not a JSON object: {payload[:80]!r}"
                )
                break
            if "error" in chunk:
                self.error = ProviderProtocolError(
                    self.provider, f"{self.provider} reported an error mid-stream: {error_text(payload)}"
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
                            texts.append(text)
                        calls = delta.get("tool_calls")
                        if calls:
                            if texts:  # text before the call stays before it
                                items.append("".join(texts))
                                texts = []
                            for raw in calls:
                                fragment = self._tool_delta(raw)
                                if fragment is not None:
                                    items.append(fragment)
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
                    self.provider, f"{self.provider} sent an unexpected chunk shape ({exc!r}): {payload[:80]!r}"
                )
                break
        if texts:
            items.append(texts[0] if len(texts) == 1 else "".join(texts))
        if self.error is not None and not items:
            raise self.error
        return items

    def _tool_delta(self, raw: dict[str, Any]) -> ToolCallDelta | None:
        """One ``delta.tool_calls`` entry as a fragment (None when it carries nothing)."""
        call_id = raw.get("id") or ""
        function = raw.get("function") or {}
        name = function.get("name") or ""
        arguments = function.get("arguments") or ""
        if type(arguments) is not str:  # an object instead of JSON text
            arguments = orjson.dumps(arguments).decode()
        index = raw.get("index")
        if index is None:
            index = self._last if self._last >= 0 and not call_id else max(self._calls, default=-1) + 1
        if type(index) is not int or index < 0 or type(call_id) is not str or type(name) is not str:
            raise ValueError(f"a tool call fragment with index {index!r}, id {call_id!r}, name {name!r}")
        known = self._calls.get(index)
        if known is None or (call_id and known[0] and call_id != known[0]):
            known = self._calls[index] = (call_id, self._count)
            self._count += 1
        elif call_id and not known[0]:
            known = self._calls[index] = (call_id, known[1])
        self._last = index
        if not (call_id or name or arguments):
            return None
        return ToolCallDelta(known[1], call_id, name, arguments)

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
