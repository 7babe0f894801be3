"""A scriptable fake of Anthropic's Messages API (``POST /v1/messages``, unary and SSE).

Checks the key (``x-api-key`` or ``Authorization: Bearer``) when ``api_key`` is set and
``anthropic-version`` when ``require_version_header``; validates requests like the real API
where cheap: ``model`` and ``max_tokens`` required, messages start with a user turn and
alternate, no ``system`` role.
Errors use ``{"type": "error", "error": {"type", "message"}, "request_id"}``; streams use the real
event sequence with ``event:`` lines; in-band errors are ``event: error``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from tests.upstreams.base import (
    FakeUpstream,
)
from tests.upstreams.behaviours import (
    Behaviour,
    ContextTooLong,
    InBandError,
    Ok,
    Overloaded,
    UnknownModel,
)
from tests.upstreams.wire import (
    ChatContext,
    Exchange,
    RecordedRequest,
    count_words,
    dumps,
)

DEFAULT_MODEL = "claude-sonnet-4-5"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


class FakeAnthropic(FakeUpstream):
    """Anthropic Messages API fake. ``FakeAnthropic(api_key="sk-test").start()``."""

    chat_path = "/v1/messages"

    def __init__(
        self,
        models: Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        require_version_header: bool = True,
        strict_roles: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """``models=None`` accepts any model name; a list makes other names 404.

        ``strict_roles`` rejects ``system``-role messages, a first turn that is not ``user`` and
        non-alternating roles (the classic API rules; SDK 2.14's docs say consecutive turns are
        now merged and its types include a system-role message, so turn it off to be lenient).
        """
        super().__init__(host=host, port=port)
        self.models = list(models) if models is not None else None
        self.api_key = api_key
        self.require_version_header = require_version_header
        self.strict_roles = strict_roles

    def response_headers(self) -> dict[str, str]:
        """Every response carries a ``request-id`` like the real API."""
        return {"request-id": f"req_{uuid.uuid4().hex[:24]}"}

    # -- routing -----------------------------------------------------------------------

    async def handle(self, rec: RecordedRequest, ex: Exchange) -> None:
        """Route: auth and version header on /v1/*, then messages and models.

        The key is accepted as ``x-api-key`` or ``Authorization: Bearer`` (SDK 2.x sends the
        latter for ``api_key=``).
        """
        if rec.path.startswith("/v1/"):
            key = rec.headers.get("x-api-key")
            bearer = rec.headers.get("authorization", "").removeprefix("Bearer ")
            if self.api_key is not None and self.api_key not in (key, bearer):
                missing = key is None and "authorization" not in rec.headers
                msg = "x-api-key header is required" if missing else "invalid x-api-key"
                await self.send_error(ex, 401, msg)
                return
            if self.require_version_header and "anthropic-version" not in rec.headers:
                await self.send_error(ex, 400, "anthropic-version: header is required")
                return
        if (rec.method, rec.path) == ("POST", self.chat_path):
            await self._messages(rec, ex)
        elif (rec.method, rec.path) == ("GET", "/v1/models"):
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in (self.models or [DEFAULT_MODEL])
            ]
            page = {"data": data, "has_more": False, "first_id": data[0]["id"]}
            await ex.respond(200, dumps({**page, "last_id": data[-1]["id"]}))
        elif rec.method == "GET" and rec.path.startswith("/v1/models/"):
            # Like the real API: one model's record, 404 not_found_error for an unknown id.
            model_id = rec.path.removeprefix("/v1/models/")
            if self.models is not None and model_id not in self.models:
                await self.send_error(ex, 404, f"model: {model_id}")
            else:
                record = {
                    "type": "model",
                    "id": model_id,
                    "display_name": model_id,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                await ex.respond(200, dumps(record))
        else:
            await self.send_error(ex, 404, "Not found")

    def _validate(self, body: Any) -> str | None:
        """The real API's message for an invalid request, or None."""
        if not isinstance(body, dict):
            return "Request body must be a JSON object"
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return f"{name}: Field required"
        if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
            return "max_tokens: must be a positive integer"
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            return "messages: at least one message is required"
        expected = "user"
        for i, msg in enumerate(messages):
            role = msg.get("role") if isinstance(msg, dict) else None
            if not self.strict_roles and role in ("user", "assistant", "system"):
                continue
            if role == "system":
                return (
                    f'messages.{i}.role: Unexpected role "system". The Messages API accepts a '
                    'top-level `system` parameter, not "system" as an input message role.'
                )
            if role not in ("user", "assistant"):
                return f"messages.{i}.role: Input should be 'user' or 'assistant'"
            if i == 0 and role != "user":
                return 'messages: first message must use the "user" role'
            if role != expected:
                return (
                    'messages: roles must alternate between "user" and "assistant", '
                    f'but found multiple "{role}" roles in a row'
                )
            expected = "assistant" if role == "user" else "user"
        return None

    async def _messages(self, rec: RecordedRequest, ex: Exchange) -> None:
        body = rec.json
        if (problem := self._validate(body)) is not None:
            await self.send_error(ex, 400, problem)
            return
        assert isinstance(body, dict)
        system = body.get("system")
        prompt = count_words(system) + sum(count_words(m.get("content")) for m in body["messages"])
        ctx = ChatContext(
            record=rec,
            body=body,
            model=str(body["model"]),
            stream=bool(body.get("stream")),
            prompt_tokens=prompt,
            max_tokens=body["max_tokens"],
            response_id=f"msg_01{uuid.uuid4().hex[:22]}",
        )
        if self.models is not None and ctx.model not in self.models:
            await ex.respond(*self.behaviour_error(ctx, UnknownModel()))
            return
        await self.run_chat(ctx, ex)

    # -- provider hooks ----------------------------------------------------------------

    def error_body(self, status: int, message: str, error_type: str | None = None) -> bytes:
        """``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
        etype = error_type or _ERROR_TYPES.get(status, "api_error")
        err = {"type": etype, "message": message}
        return dumps({"type": "error", "error": err, "request_id": f"req_{uuid.uuid4().hex[:24]}"})

    def behaviour_error(self, ctx: ChatContext, beh: Behaviour) -> tuple[int, bytes]:
        """UnknownModel -> 404, ContextTooLong -> 400 "prompt is too long", Overloaded -> 529."""
        if isinstance(beh, UnknownModel):
            return 404, self.error_body(404, f"model: {ctx.model}")
        if isinstance(beh, ContextTooLong):
            msg = f"prompt is too long: {max(ctx.prompt_tokens, 200_001)} tokens > 200000 maximum"
            return 400, self.error_body(400, msg)
        if isinstance(beh, Overloaded):
            return 529, self.error_body(529, "Overloaded")
        raise TypeError(f"unsupported behaviour {beh!r}")

    def _message(self, ctx: ChatContext, content: list[dict[str, Any]], stop: str | None, n: int) -> dict[str, Any]:
        return {
            "id": ctx.response_id,
            "type": "message",
            "role": "assistant",
            "model": ctx.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "input_tokens": ctx.prompt_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": n,
                "service_tier": "standard",
            },
        }

    def unary_body(self, ctx: ChatContext, ok: Ok, tokens: list[str], finish: str | None) -> bytes:
        """A ``message`` object with one text block."""
        stop = STOP_REASONS.get(finish, finish) if finish is not None else None
        content = [{"type": "text", "text": "".join(tokens)}]
        return dumps(self._message(ctx, content, stop, len(tokens)))

    def sse_preamble(self, ctx: ChatContext) -> list[bytes]:
        """message_start, content_block_start, ping."""
        block = {"type": "text", "text": ""}
        return [
            _event(
                "message_start",
                {
                    "type": "message_start",
                    "message": self._message(ctx, [], None, 1),
                },
            ),
            _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
            _event("ping", {"type": "ping"}),
        ]

    def sse_token(self, ctx: ChatContext, i: int, text: str, finish: str | None) -> bytes:
        """content_block_delta with a text_delta."""
        delta = {"type": "text_delta", "text": text}
        return _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    def sse_finish(self, ctx: ChatContext, finish: str, n: int, already: bool) -> list[bytes]:
        """content_block_stop, message_delta (stop_reason, output_tokens), message_stop."""
        delta = {"stop_reason": STOP_REASONS.get(finish, finish), "stop_sequence": None}
        return [
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", {"type": "message_delta", "delta": delta, "usage": {"output_tokens": n}}),
            _event("message_stop", {"type": "message_stop"}),
        ]

    def sse_end_without_finish(self, ctx: ChatContext, n: int) -> list[bytes]:
        """content_block_stop and message_stop, but no message_delta (stop_reason stays null)."""
        return [
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_stop", {"type": "message_stop"}),
        ]

    def sse_error(self, ctx: ChatContext, beh: InBandError) -> list[bytes]:
        """``event: error`` with an error object (default type ``overloaded_error``)."""
        err = {"type": beh.error_type or "overloaded_error", "message": beh.message}
        return [_event("error", {"type": "error", "error": err})]

    def sse_malformed(self, ctx: ChatContext) -> bytes:
        """A content_block_delta whose data is not JSON."""
        return b"event: content_block_delta\ndata: {not json\n\n"
