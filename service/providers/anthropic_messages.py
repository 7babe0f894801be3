"""The request the gateway sends to Anthropic's Messages API (no I/O).

The provider (:mod:`service.providers.anthropic`) makes the calls; structured output and reading
answers back are in :mod:`service.providers.anthropic_structured`.

Conversation:

* ``system`` is a top-level parameter: every system message is moved there.
* Roles alternate and open with the user: consecutive same-role messages are merged (``tool``
  messages count as the user's), and a conversation that opens with the assistant gets a short
  user turn in front. A trailing assistant message is kept: Anthropic continues it (prefill), and
  its trailing whitespace is trimmed (the API refuses it).
* Assistant ``tool_calls`` become ``tool_use`` blocks (``input`` is the parsed arguments) after
  the turn's text; consecutive ``tool`` messages become one user message of ``tool_result``
  blocks, placed first in that message (the API wants them at its start). The API also wants
  every ``tool_use`` answered in the very next message and every ``tool_result`` to answer the
  message before; where the caller's history does not, it is made to (each change recorded as
  an :class:`Adjustment`): an unanswered call gets an ``is_error`` result saying no result was
  given, a result that answers no call of the turn before travels as text. Call ids outside
  ``[A-Za-z0-9_-]`` (ids minted by other providers) are rewritten the same way in both blocks.
  History with tool blocks but no ``tools`` (the API refuses that) declares the tools it names,
  with ``tool_choice: none``.
* Images: an ``https:`` URL is an ``image`` block with a ``url`` source, a data URL one with a
  ``base64`` source (media type and payload).

Tools: ``tools=[{name, description, input_schema}]`` (``input_schema.type`` defaults to
``object``, which the API requires); ``strict`` is sent where the model has structured outputs
(its schema rewritten by the SDK's ``transform_schema`` into the subset strict mode accepts), and
dropped elsewhere. ``tool_choice``: auto -> ``auto``, required -> ``any``, none -> ``none``, a
function -> ``{"type": "tool", "name"}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import anthropic

from service.providers.anthropic_structured import AnswerTool, answer_tool, native_schema, native_structured_output
from service.providers.base import ChatMessage, ChatRequest, ImagePart

# Anthropic requires the first turn to be the user's; this stands in when the caller's is not.
LEADING_USER_TURN = "(continuing the conversation below)"
MISSING_RESULT = "(no result was given for this call)"

_TOOL_ID = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Adjustment:
    """One change made to a request so that Anthropic accepts it (recorded on the attempt span).

    Attributes:
        param: The Anthropic parameter changed (``top_p``, ``temperature``, ``stop_sequences``,
            ``messages``, ``tools``, ``tool_choice``).
        action: ``dropped``, ``clamped``, ``trimmed``, ``added`` or ``rewritten``.
        detail: Why, in a sentence (never the caller's text).
    """

    param: str
    action: str
    detail: str


@dataclass(slots=True)
class Translated:
    """A request as ``messages.create`` arguments, what changed, and the answer tool if any."""

    params: dict[str, Any]
    adjustments: list[Adjustment] = field(default_factory=list)
    answer_tool: AnswerTool | None = None


# ----------------------------------------------------------------------------- conversation


class _Ids:
    """Tool-call ids as Anthropic accepts them (``[A-Za-z0-9_-]+``), the same for use and result."""

    def __init__(self) -> None:
        self._map: dict[str, str] = {}
        self.rewritten = 0

    def __call__(self, call_id: str) -> str:
        if call_id in self._map:
            return self._map[call_id]
        safe = call_id if _TOOL_ID.fullmatch(call_id) else re.sub(r"[^A-Za-z0-9_-]", "_", call_id) or "call"
        base, n = safe, 2
        while safe in self._map.values():
            safe, n = f"{base}_{n}", n + 1
        if safe != call_id:
            self.rewritten += 1
        self._map[call_id] = safe
        return safe


def image_block(part: ImagePart) -> dict[str, Any]:
    """An ``image`` block: a ``url`` source for https, a ``base64`` source for a data URL."""
    if part.is_data_url:
        media_type, data = part.data()
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": part.url}}


def _blocks(m: ChatMessage, ids: _Ids) -> list[dict[str, Any]]:
    if m.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": ids(m.tool_call_id)}
        if m.text().strip():
            result["content"] = m.text()
        return [result]
    out: list[dict[str, Any]] = []
    if m.has_images:
        for p in m.parts:
            if isinstance(p, ImagePart):
                out.append(image_block(p))
            elif p.text.strip():  # the API refuses empty and whitespace-only text blocks
                out.append({"type": "text", "text": p.text})
    elif m.text().strip():
        out.append({"type": "text", "text": m.text()})
    for call in m.tool_calls:
        arguments = json.loads(call.arguments or "{}")  # validated as a JSON object by the servicer
        out.append({"type": "tool_use", "id": ids(call.id), "name": call.name, "input": arguments})
    return out


def _pair_tool_results(turns: list[dict[str, Any]], adjustments: list[Adjustment]) -> None:
    """Every ``tool_use`` answered in the next turn, every ``tool_result`` answering the turn before."""
    pending: list[str] = []
    orphans = missing = 0
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            pending = [b["id"] for b in turn["content"] if b["type"] == "tool_use"]
            if pending and i == len(turns) - 1:
                turns.append({"role": "user", "content": []})  # answered below, on the next pass
            continue
        kept: list[dict[str, Any]] = []
        texts: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        for block in turn["content"]:
            if block["type"] != "tool_result":
                others.append(block)
            elif block["tool_use_id"] in pending and all(k["tool_use_id"] != block["tool_use_id"] for k in kept):
                kept.append(block)
            else:
                orphans += 1
                content = block.get("content", "")
                texts.append({"type": "text", "text": f"Result of tool call {block['tool_use_id']}: {content}"})
        answered = {k["tool_use_id"] for k in kept}
        for call_id in pending:
            if call_id not in answered:
                missing += 1
                kept.append(
                    {"type": "tool_result", "tool_use_id": call_id, "content": MISSING_RESULT, "is_error": True}
                )
        turn["content"] = kept + texts + others
        pending = []
    if missing:
        adjustments.append(Adjustment("messages", "added", f"{missing} tool call(s) had no result; sent as errors"))
    if orphans:
        detail = f"{orphans} tool result(s) answered no call of the turn before; sent as text"
        adjustments.append(Adjustment("messages", "rewritten", detail))


def _collapse(turn: dict[str, Any]) -> dict[str, Any]:
    """A turn of text blocks only is sent as one string (what the API shows in its examples)."""
    blocks = turn["content"]
    if all(b["type"] == "text" for b in blocks):
        return {"role": turn["role"], "content": "\n\n".join(b["text"] for b in blocks)}
    return turn


def to_anthropic(
    messages: Iterable[ChatMessage], adjustments: list[Adjustment] | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """The system prompt and alternating turns that open with the user (see the module doc)."""
    adjustments = [] if adjustments is None else adjustments
    messages = tuple(messages)
    system = "\n\n".join(m.text() for m in messages if m.role == "system") or None
    ids = _Ids()
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            continue
        role = "assistant" if m.role == "assistant" else "user"
        blocks = _blocks(m, ids)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    _pair_tool_results(turns, adjustments)
    if ids.rewritten:
        adjustments.append(
            Adjustment("messages", "rewritten", f"{ids.rewritten} tool call id(s) outside [A-Za-z0-9_-]")
        )
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": LEADING_USER_TURN}]})
    _trim_prefill(turns, adjustments)
    return system, [_collapse(t) for t in turns]


def _trim_prefill(turns: list[dict[str, Any]], adjustments: list[Adjustment]) -> None:
    # "final assistant content cannot end with trailing whitespace"
    last = turns[-1]
    if last["role"] != "assistant" or last["content"][-1]["type"] != "text":
        return
    block = last["content"][-1]
    if block["text"] == block["text"].rstrip():
        return
    block["text"] = block["text"].rstrip()
    action = "trimmed" if block["text"] else "dropped"
    if not block["text"]:
        last["content"].pop()
        if not last["content"]:
            turns.pop()
    adjustments.append(Adjustment("messages", action, "the final assistant turn (prefill) ended in whitespace"))


# ----------------------------------------------------------------------------- tools


def _tools(request: ChatRequest, native: bool, adjustments: list[Adjustment]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    dropped = 0
    for t in request.tools:
        schema = {"type": "object", **dict(t.parameters)}
        tool: dict[str, Any] = {"name": t.name, "input_schema": schema}
        if t.description:
            tool["description"] = t.description
        if t.strict:
            try:
                strict_schema = anthropic.transform_schema(schema) if native else None
            except (ValueError, TypeError, AttributeError):
                strict_schema = None
            if strict_schema is None:
                dropped += 1
            else:
                tool["input_schema"], tool["strict"] = strict_schema, True
        out.append(tool)
    if dropped:
        adjustments.append(
            Adjustment("tools", "dropped", f"strict on {dropped} tool(s): the model or schema lacks strict tool use")
        )
    return out


def _history_tools(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = [
        b["name"] for t in turns if isinstance(t["content"], list) for b in t["content"] if b["type"] == "tool_use"
    ]
    return [{"name": n, "input_schema": {"type": "object"}} for n in dict.fromkeys(names)]


def _choice(request: ChatRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice is None:
        return None
    if choice.function:
        return {"type": "tool", "name": choice.function}
    return {"type": {"auto": "auto", "required": "any", "none": "none"}[choice.mode or "auto"]}


def translate(request: ChatRequest, default_model: str) -> Translated:
    """The ``messages.create`` arguments for ``request``, and what had to change for Anthropic.

    The gateway validates requests against OpenAI's rules; each adjustment is one that Anthropic's
    API would otherwise answer with a 400 (``invalid_request_error``), which the caller would see as
    INVALID_ARGUMENT exactly when Anthropic is the last provider left.
    """
    adjustments: list[Adjustment] = []
    model = request.model or default_model
    native = native_structured_output(model)
    system, turns = to_anthropic(request.messages, adjustments)
    params: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens, "messages": turns}
    if system:
        params["system"] = system
    _sampling(request, params, adjustments)
    tools = _tools(request, native, adjustments)
    choice = _choice(request) if tools else None
    if not tools and (history := _history_tools(turns)):
        # "Requests which include tool_use or tool_result blocks must define tools."
        tools, choice = history, {"type": "none"}
        adjustments.append(Adjustment("tools", "added", "the conversation has tool calls but the request no tools"))
    answer: AnswerTool | None = None
    fmt = request.response_format
    if fmt is not None and not (request.tool_choice and request.tool_choice.function):
        schema = native_schema(fmt) if native else None
        if schema is not None:
            params["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        else:
            answer, tool = answer_tool(fmt, {t["name"] for t in tools})
            caller_none = request.tool_choice is not None and request.tool_choice.mode == "none"
            if request.tools and not caller_none:
                choice = {"type": "any"}  # one of the caller's tools, or the answer
            else:
                choice = {"type": "tool", "name": answer.name, "disable_parallel_tool_use": True}
            tools.append(tool)
    if tools:
        params["tools"] = tools
    if choice is not None:
        params["tool_choice"] = choice
    return Translated(params, adjustments, answer)


def _sampling(request: ChatRequest, params: dict[str, Any], adjustments: list[Adjustment]) -> None:
    temperature, top_p = request.temperature, request.top_p
    if temperature is not None and top_p is not None:
        # "`temperature` and `top_p` cannot both be specified for this model"
        top_p = None
        adjustments.append(Adjustment("top_p", "dropped", "Anthropic takes temperature or top_p, not both"))
    sampling: dict[str, float] = {}
    if temperature is not None:
        if temperature > 1.0:
            adjustments.append(
                Adjustment("temperature", "clamped", f"{temperature:g} is above Anthropic's range 0..1; sent 1")
            )
            temperature = 1.0
        sampling["temperature"] = temperature
    if top_p is not None:
        sampling["top_p"] = top_p
    if sampling:
        # SDK 1.0 dropped temperature/top_p from the method signatures (a TypeError before any
        # request is sent); the API still takes them, and extra_body is the SDK's documented way.
        params["extra_body"] = sampling
    stops = [s for s in request.stop if s.strip()]
    if len(stops) < len(request.stop):
        # "stop_sequences: each stop sequence must contain non-whitespace"
        n = len(request.stop) - len(stops)
        adjustments.append(Adjustment("stop_sequences", "dropped", f"{n} whitespace-only stop sequence(s)"))
    if stops:
        params["stop_sequences"] = stops


def to_params(request: ChatRequest, default_model: str) -> tuple[dict[str, Any], list[Adjustment]]:
    """:func:`translate` without the answer tool: the arguments and the adjustments."""
    translated = translate(request, default_model)
    return translated.params, translated.adjustments
