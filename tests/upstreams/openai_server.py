"""A scriptable fake of vLLM's OpenAI-compatible server (as served on Modal or a plain host).

Endpoints: ``POST /v1/chat/completions`` (unary and SSE), ``GET /health``, ``GET /v1/models``,
``GET /metrics`` (a few ``vllm:`` gauges). Agent fields are checked as vLLM checks them
(``openai_rules``: a malformed ``tools`` entry is a 400), :class:`ToolCalls` scripts tool-call
streams, and ``received`` shows what each chat request carried (tools, tool_choice,
response_format, images, tool results). Auth: ``api_key`` guards ``/v1/*`` like vLLM's
``--api-key`` (401 ``{"error": "Unauthorized"}``); ``required_headers`` guards every path like
Modal's proxy auth (``Modal-Key`` / ``Modal-Secret``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    ToolCalls,
    ToolFragment,
    UnknownModel,
)
from tests.upstreams.openai_rules import problem
from tests.upstreams.wire import (
    ChatContext,
    Exchange,
    RecordedRequest,
    count_words,
    dumps,
)

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
}


@dataclass
class Received:
    """The agent fields of one chat request, as the upstream received them."""

    body: dict[str, Any]
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    images: list[str] = field(default_factory=list)  # image_url part URLs, in order
    tool_results: list[tuple[str, Any]] = field(default_factory=list)  # (tool_call_id, content)

    @classmethod
    def of(cls, body: dict[str, Any]) -> Received:
        """Reads the fields out of a request body."""
        messages = body.get("messages") or []
        return cls(
            body=body,
            tools=body.get("tools") or [],
            tool_choice=body.get("tool_choice"),
            response_format=body.get("response_format"),
            images=[
                p["image_url"]["url"]
                for m in messages
                if isinstance(m.get("content"), list)
                for p in m["content"]
                if p.get("type") == "image_url"
            ],
            tool_results=[(m["tool_call_id"], m["content"]) for m in messages if m.get("role") == "tool"],
        )


class FakeOpenAI(FakeUpstream):
    """vLLM-compatible fake. ``FakeOpenAI(models=[...]).start()``; see the module docstring."""

    chat_path = "/v1/chat/completions"

    def __init__(
        self,
        models: Sequence[str] = (DEFAULT_MODEL,),
        *,
        max_model_len: int = 4096,
        strict_models: bool = True,
        api_key: str | None = None,
        required_headers: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Configure the served model list, auth and limits; call ``start()`` to serve."""
        super().__init__(host=host, port=port)
        self.models = list(models)
        self.max_model_len = max_model_len
        self.strict_models = strict_models
        self.api_key = api_key
        self.required_headers = {k.lower(): v for k, v in (required_headers or {}).items()}
        self.running = 0
        self.health_status = 200  # what GET /health answers (a probe can fail while chat works)
        self._taken: Behaviour | None = None

    def reset(self) -> None:
        """Also puts /health back to 200."""
        super().reset()
        self.health_status = 200

    # -- routing -----------------------------------------------------------------------

    async def handle(self, rec: RecordedRequest, ex: Exchange) -> None:
        """Route: proxy auth, /health, --api-key on /v1/*, models, metrics, chat."""
        if any(rec.headers.get(k) != v for k, v in self.required_headers.items()):
            body = b"modal-http: invalid or missing credentials for proxy authorization"
            await ex.respond(401, body, "text/plain; charset=utf-8")
            return
        route = (rec.method, rec.path)
        if route == ("GET", "/health"):
            await ex.respond(self.health_status, b"", "application/json")
            return
        if route == ("GET", "/metrics"):
            await ex.respond(200, self._metrics(), "text/plain; version=0.0.4")
            return
        if rec.path.startswith("/v1/") and self.api_key is not None:
            if rec.headers.get("authorization") != f"Bearer {self.api_key}":
                await ex.respond(401, dumps({"error": "Unauthorized"}))
                return
        if route == ("GET", "/v1/models"):
            data = [
                {"id": m, "object": "model", "owned_by": "vllm", "root": m, "max_model_len": self.max_model_len}
                for m in self.models
            ]
            await ex.respond(200, dumps({"object": "list", "data": data}))
        elif route == ("POST", self.chat_path):
            await self._chat(rec, ex)
        elif rec.path in ("/health", "/v1/models", self.chat_path):
            await ex.respond(405, dumps({"detail": "Method Not Allowed"}))
        else:
            await ex.respond(404, dumps({"detail": "Not Found"}))

    def _metrics(self) -> bytes:
        name = self.models[0] if self.models else ""
        lines = [
            f'vllm:num_requests_running{{model_name="{name}"}} {float(self.running)}',
            f'vllm:num_requests_waiting{{model_name="{name}"}} 0.0',
        ]
        return ("\n".join(lines) + "\n").encode()

    async def _chat(self, rec: RecordedRequest, ex: Exchange) -> None:
        body = rec.json
        if not isinstance(body, dict):
            await self.send_error(ex, 400, "Request body must be a JSON object")
            return
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            await self.send_error(ex, 400, "messages: Field required")
            return
        bad = problem(body)
        if bad is not None:
            await self.send_error(ex, 400, bad)
            return
        stream = bool(body.get("stream"))
        if body.get("stream_options") is not None and not stream:
            await self.send_error(ex, 400, "Stream options can only be defined when `stream=True`.")
            return
        model = body.get("model") or (self.models[0] if self.models else DEFAULT_MODEL)
        ctx = ChatContext(
            record=rec,
            body=body,
            model=model,
            stream=stream,
            prompt_tokens=sum(count_words(m.get("content")) for m in messages if isinstance(m, dict)),
            max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
            response_id=f"chatcmpl-{uuid.uuid4().hex}",
            include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        )
        if self.strict_models and model not in self.models:
            status, err = self.behaviour_error(ctx, UnknownModel())
            await ex.respond(status, err)
            return
        self.running += 1
        try:
            await self.run_chat(ctx, ex)
        finally:
            self.running -= 1

    def next_behaviour(self) -> Behaviour:
        """The behaviour :meth:`run_chat` already took, else the next one."""
        taken, self._taken = self._taken, None
        return taken if taken is not None else super().next_behaviour()

    @property
    def received(self) -> list[Received]:
        """What each chat request carried, oldest first."""
        return [Received.of(r.json) for r in self.chat_requests if isinstance(r.json, dict)]

    async def run_chat(self, ctx: ChatContext, ex: Exchange) -> None:
        """Answers :class:`ToolCalls` here; every other behaviour as the base class does."""
        beh = self.next_behaviour()
        if not isinstance(beh, ToolCalls):
            # The base class takes it back from next_behaviour() before its first await, so no
            # other request can come between.
            self._taken = beh
            await super().run_chat(ctx, ex)
            return
        ctx.record.behaviour = beh
        if not ctx.stream:
            await ex.respond(200, self._tool_calls_body(ctx, beh))
            return
        await ex.start_stream()
        for event in self.sse_preamble(ctx):
            await ex.send_event(event)
        for step in beh.steps:
            if isinstance(step, str):
                delta: dict[str, Any] = {"content": step}
            else:
                delta = {"tool_calls": [_fragment(f) for f in (step if isinstance(step, tuple) else (step,))]}
            await ex.send_event(self._chunk(ctx, [self._choice(delta, None)]))
        for event in self.sse_finish(ctx, beh.finish_reason, len(beh.steps), False):
            await ex.send_event(event)
        await ex.end_stream()

    def _tool_calls_body(self, ctx: ChatContext, beh: ToolCalls) -> bytes:
        text, calls = beh.assembled()
        message = {
            "role": "assistant",
            "content": text or None,
            "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in calls
            ],
        }
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": beh.finish_reason}
        obj = {
            "id": ctx.response_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [choice],
            "usage": self._usage(ctx, len(beh.steps)),
        }
        return dumps(obj)

    # -- provider hooks ----------------------------------------------------------------

    def error_body(self, status: int, message: str, error_type: str | None = None) -> bytes:
        """vLLM's ``{"error": {"message", "type", "param", "code"}}``."""
        etype = error_type or _ERROR_TYPES.get(status, "InternalServerError")
        return dumps({"error": {"message": message, "type": etype, "param": None, "code": status}})

    def behaviour_error(self, ctx: ChatContext, beh: Behaviour) -> tuple[int, bytes]:
        """UnknownModel -> 404, ContextTooLong -> 400 (vLLM wording), Overloaded -> 503."""
        if isinstance(beh, UnknownModel):
            err = {
                "message": f"The model `{ctx.model}` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
            return 404, dumps({"error": err})
        if isinstance(beh, ContextTooLong):
            prompt = max(ctx.prompt_tokens, self.max_model_len)
            completion = ctx.max_tokens or 16
            msg = (
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt + completion} tokens ({prompt} in the messages, "
                f"{completion} in the completion). Please reduce the length of the messages "
                "or completion."
            )
            return 400, self.error_body(400, msg)
        if isinstance(beh, Overloaded):
            return 503, self.error_body(503, "Service Unavailable")
        raise TypeError(f"unsupported behaviour {beh!r}")

    def _usage(self, ctx: ChatContext, n: int) -> dict[str, int]:
        return {
            "prompt_tokens": ctx.prompt_tokens,
            "total_tokens": ctx.prompt_tokens + n,
            "completion_tokens": n,
        }

    def _chunk(self, ctx: ChatContext, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = {
            "id": ctx.response_id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + dumps(obj) + b"\n\n"

    @staticmethod
    def _choice(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }

    def unary_body(self, ctx: ChatContext, ok: Ok, tokens: list[str], finish: str | None) -> bytes:
        """A ``chat.completion`` object."""
        message = {"role": "assistant", "content": "".join(tokens), "tool_calls": []}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }
        obj = {
            "id": ctx.response_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [choice],
            "usage": self._usage(ctx, len(tokens)),
            "prompt_logprobs": None,
        }
        return dumps(obj)

    def sse_preamble(self, ctx: ChatContext) -> list[bytes]:
        """The role chunk: ``delta = {"role": "assistant", "content": ""}``."""
        return [self._chunk(ctx, [self._choice({"role": "assistant", "content": ""}, None)])]

    def sse_token(self, ctx: ChatContext, i: int, text: str, finish: str | None) -> bytes:
        """``delta = {"content": text}``."""
        return self._chunk(ctx, [self._choice({"content": text}, finish)])

    def sse_finish(self, ctx: ChatContext, finish: str, n: int, already: bool) -> list[bytes]:
        """Finish chunk (unless already sent), usage chunk if requested, ``[DONE]``."""
        events = [] if already else [self._chunk(ctx, [self._choice({}, finish)])]
        if ctx.include_usage:
            events.append(self._chunk(ctx, [], usage=self._usage(ctx, n)))
        return [*events, b"data: [DONE]\n\n"]

    def sse_end_without_finish(self, ctx: ChatContext, n: int) -> list[bytes]:
        """Just ``[DONE]``."""
        return [b"data: [DONE]\n\n"]

    def sse_error(self, ctx: ChatContext, beh: InBandError) -> list[bytes]:
        """``data: {"error": {...}}`` then ``[DONE]``, as vLLM does mid-stream."""
        return [b"data: " + self.error_body(500, beh.message, beh.error_type) + b"\n\n", b"data: [DONE]\n\n"]


def _fragment(f: ToolFragment) -> dict[str, Any]:
    """A ``delta.tool_calls`` entry as vLLM sends it: unset fields left out."""
    out: dict[str, Any] = {"index": f.index}
    if f.id:
        out |= {"id": f.id, "type": "function"}
    function = {k: v for k, v in (("name", f.name), ("arguments", f.arguments)) if v}
    if function:
        out["function"] = function
    return out
