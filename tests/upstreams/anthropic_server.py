"""A scriptable fake of Anthropic's Messages API (``POST /v1/messages``, unary and SSE).

Checks the key (``x-api-key`` or ``Authorization: Bearer``) when ``api_key`` is set and
``anthropic-version`` when ``require_version_header``; validates requests like the real API
where cheap: ``model`` and ``max_tokens`` required, messages start with a user turn and
alternate, no ``system`` role; and the rules current Claude models enforce with a 400
``invalid_request_error`` (wording as reported from the real API): ``temperature`` and ``top_p``
not both, ``temperature`` and ``top_p`` within 0..1, no whitespace-only stop sequence, no trailing
whitespace on a final assistant turn.
``GET /v1/models`` pages like the real API (``limit`` default 20, at most 1000; ``after_id`` /
``before_id``; ``has_more``, ``first_id``, ``last_id``) and ``GET /v1/models/{id}`` answers one
record (resolving ``aliases``) or 404 ``not_found_error``.
Errors use ``{"type": "error", "error": {"type", "message"}, "request_id"}``; streams use the real
event sequence with ``event:`` lines; in-band errors are ``event: error``.

Tools, content blocks (images, ``tool_use``, ``tool_result``) and ``output_config`` are checked by
``tests.upstreams.anthropic_rules``. Answers with tool calls are scripted with :class:`Blocks`
(text and ``tool_use`` blocks, streamed as the real API does: ``content_block_start`` with the
``tool_use`` block and ``input: {}``, ``input_json_delta`` fragments, ``stop_reason: tool_use``);
a script that contradicts the request (a tool it does not declare, a call under ``tool_choice:
none``, text or no call under ``any``/``tool``) fails the test, since the real API guarantees
those. A plain ``Ok`` under ``tool_choice`` ``any``/``tool`` answers with a call whose input is
``{}``, as the real API would answer with some call.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from tests.upstreams.anthropic_blocks import (
    Blocks,
    TextBlock,
    ToolUseBlock,
    _event,
    block_events,
    check_script,
    forced_call,
    unary_content,
)
from tests.upstreams.anthropic_rules import check_content, check_output_config, check_tools
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
    _phrase,
    count_words,
    dumps,
)

__all__ = ["Blocks", "FakeAnthropic", "TextBlock", "ToolUseBlock"]

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

# The real API's messages for the rules below (from public reports of its 400 answers).
BOTH_SAMPLING = "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
WHITESPACE_STOP = "stop_sequences: each stop sequence must contain non-whitespace"
TRAILING_PREFILL = "messages: final assistant content cannot end with trailing whitespace"
MAX_MODELS_LIMIT = 1000
DEFAULT_MODELS_LIMIT = 20

_DATED = re.compile(r"(.+)-(\d{4})(\d{2})(\d{2})")


def model_record(model_id: str) -> dict[str, Any]:
    """The real API's model object: ``claude-sonnet-4-5-20250929`` -> "Claude Sonnet 4.5", created
    that day."""
    match = _DATED.fullmatch(model_id)
    stem, created = (match[1], f"{match[2]}-{match[3]}-{match[4]}") if match else (model_id, "2025-01-01")
    words: list[str] = []
    for part in stem.split("-"):
        if part.isdigit() and words and words[-1][-1].isdigit():
            words[-1] += "." + part
        else:
            words.append(part.capitalize() if not part.isdigit() else part)
    return {"type": "model", "id": model_id, "display_name": " ".join(words), "created_at": f"{created}T00:00:00Z"}


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the last text block of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        return texts[-1] if texts else ""
    return ""


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
        aliases: Mapping[str, str] | None = None,
        exclusive_sampling: bool = True,
        structured_outputs: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """``models=None`` accepts any model name; a list makes other names 404.

        ``strict_roles`` rejects ``system``-role messages, a first turn that is not ``user`` and
        non-alternating roles (the classic API rules; SDK 2.14's docs say consecutive turns are
        now merged and its types include a system-role message, so turn it off to be lenient).
        ``aliases`` maps alias -> model id (``claude-sonnet-4-5`` -> ``claude-sonnet-4-5-20250929``):
        the list names only ids, while messages and ``GET /v1/models/{alias}`` accept aliases.
        ``exclusive_sampling`` rejects ``temperature`` with ``top_p`` (current models; Claude 3 took
        both). ``structured_outputs`` lists the models that take ``output_config.format`` and
        ``strict`` tools (None: every model). Set ``models_status`` to answer every ``/v1/models*``
        request with that status.
        """
        super().__init__(host=host, port=port)
        self.models = list(models) if models is not None else None
        self.api_key = api_key
        self.require_version_header = require_version_header
        self.strict_roles = strict_roles
        self.aliases = dict(aliases or {})
        self.exclusive_sampling = exclusive_sampling
        self.structured_outputs = list(structured_outputs) if structured_outputs is not None else None
        self.models_status: int | None = None
        self._replay: Any = None

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
        elif rec.method == "GET" and (rec.path == "/v1/models" or rec.path.startswith("/v1/models/")):
            if self.models_status is not None:
                await self.send_error(ex, self.models_status, _phrase(self.models_status))
            elif rec.path == "/v1/models":
                await self._list_models(rec, ex)
            else:
                await self._get_model(rec.path.removeprefix("/v1/models/"), ex)
        else:
            await self.send_error(ex, 404, "Not found")

    def _resolve(self, model: str) -> str | None:
        """The model id ``model`` names (itself or through an alias); None when not served."""
        if self.models is None:
            return model
        resolved = self.aliases.get(model, model)
        return resolved if resolved in self.models else None

    async def _list_models(self, rec: RecordedRequest, ex: Exchange) -> None:
        """One page of models, newest first as given, with the real API's cursor fields."""
        ids = self.models if self.models is not None else [DEFAULT_MODEL]
        query = dict(parse_qsl(rec.query))
        try:
            limit = int(query.get("limit", DEFAULT_MODELS_LIMIT))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_MODELS_LIMIT:
            await self.send_error(ex, 400, f"limit: Input should be between 1 and {MAX_MODELS_LIMIT}")
            return
        lo, hi = 0, len(ids)
        if "after_id" in query and query["after_id"] in ids:
            lo = ids.index(query["after_id"]) + 1
        if "before_id" in query and query["before_id"] in ids:
            hi = ids.index(query["before_id"])
            lo = max(lo, hi - limit)
        page = ids[lo : min(hi, lo + limit)]
        more = (lo > 0) if "before_id" in query else (lo + len(page) < hi)
        body = {
            "data": [model_record(m) for m in page],
            "has_more": more,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
        await ex.respond(200, dumps(body))

    async def _get_model(self, model: str, ex: Exchange) -> None:
        """One model's record (an alias answers with the id it stands for), else 404."""
        resolved = self._resolve(model)
        if resolved is None:
            await self.send_error(ex, 404, f"model: {model}")
        else:
            await ex.respond(200, dumps(model_record(resolved)))

    def _validate_sampling(self, body: dict[str, Any]) -> str | None:
        """temperature/top_p ranges, the two together, and stop sequences."""
        for name in ("temperature", "top_p"):
            value = body.get(name)
            if value is not None and (not isinstance(value, int | float) or not 0 <= value <= 1):
                return f"{name}: range: 0..1"
        if self.exclusive_sampling and body.get("temperature") is not None and body.get("top_p") is not None:
            return BOTH_SAMPLING
        stops = body.get("stop_sequences")
        if stops is not None:
            if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
                return "stop_sequences: Input should be a valid list of strings"
            if any(not x.strip() for x in stops):
                return WHITESPACE_STOP
        return None

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
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            text = _text_of(last.get("content"))
            if text != text.rstrip():
                return TRAILING_PREFILL
        structured = self._structured(str(body["model"]))
        return (
            check_content(messages, bool(body.get("tools")))
            or check_tools(body, structured)
            or check_output_config(body, structured)
            or self._validate_sampling(body)
        )

    def _structured(self, model: str) -> bool:
        """Whether ``model`` (or the id its alias names) takes structured outputs."""
        if self.structured_outputs is None:
            return True
        return model in self.structured_outputs or self.aliases.get(model) in self.structured_outputs

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
        if self._resolve(ctx.model) is None:
            await ex.respond(*self.behaviour_error(ctx, UnknownModel()))
            return
        await self.run_chat(ctx, ex)

    # -- scripted blocks ---------------------------------------------------------------

    def next_behaviour(self) -> Any:
        """The behaviour :meth:`run_chat` already took, else the next one queued."""
        if self._replay is not None:
            beh, self._replay = self._replay, None
            return beh
        return super().next_behaviour()

    async def run_chat(self, ctx: ChatContext, ex: Exchange) -> None:
        """Answers :class:`Blocks` here; everything else through the shared driver."""
        beh = forced_call(ctx.body, self.next_behaviour())
        if not isinstance(beh, Blocks):
            # The shared driver takes its behaviour first thing, before any await: it gets this one.
            self._replay = beh
            await super().run_chat(ctx, ex)
            return
        ctx.record.behaviour = beh  # type: ignore[assignment]  # a stand-in-only behaviour
        check_script(ctx.body, beh)
        if not ctx.stream:
            content, n = unary_content(beh)
            await ex.respond(200, dumps(self._message(ctx, content, beh.stop, n)))
            return
        await ex.start_stream()
        start = {"type": "message_start", "message": self._message(ctx, [], None, 1)}
        for event in [_event("message_start", start), *block_events(beh)]:
            await ex.send_event(event)
        await ex.end_stream()

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
