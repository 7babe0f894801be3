"""Structured output on Anthropic, and reading answers back (no I/O).

Which request gets which (the gateway validates every answer against the schema afterwards anyway):

* ``json_schema`` on Claude 4.5 and later (``claude-{opus,sonnet,haiku}-4-5`` and up, the models
  Anthropic lists for structured outputs: Sonnet 4.5, Opus 4.5, Haiku 4.5, Opus 4.6, Sonnet
  4.6, ...), with an object at the schema's root and no recursive ``$ref``: the native
  ``output_config={"format": {"type": "json_schema", "schema": ...}}``, the schema rewritten by
  ``anthropic.transform_schema`` (``additionalProperties: false`` on every object, which the API
  requires; constraints it does not take, such as ``maxLength``, moved into descriptions).
* Every other case (Claude 4.1 and older, Claude 3, model names this module cannot place, roots
  that are not objects, recursive schemas) and every ``json_object`` request: a forced tool call.
  A tool whose ``input_schema`` is the schema (a non-object root is wrapped as ``{"value": ...}``)
  is added and forced (``tool_choice`` ``tool``; ``any`` when the caller's own tools may be called
  instead), and its input comes back as the answer's *text*, streamed as it arrives, so the
  router's schema check sees JSON. ``json_object`` always takes this path: the native parameter
  only takes schemas that forbid unknown properties, so it cannot ask for "any object", while a
  tool's ``input_schema`` of ``{"type": "object"}`` can. A request that names a tool in
  ``tool_choice`` is answered by that tool call and gets neither.

Answers: text deltas pass through; ``tool_use`` blocks become :class:`ToolCallDelta` fragments
(see :class:`StreamDecoder`); the answer tool's input becomes the text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anthropic

from service.providers.base import FinishReason, ResponseFormat, StreamItem, ToolCallDelta

# The forced tool's name for json_object (json_schema uses the schema's name).
ANSWER_TOOL = "json_answer"
ANSWER_TOOL_DESCRIPTION = "Give your whole answer by calling this tool: its input is the answer."

_STOP = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}
# claude-sonnet-4-5, claude-haiku-4-5-20251001, claude-opus-4-1-20250805, claude-sonnet-4-20250514
_FAMILY = re.compile(r"claude-(?:opus|sonnet|haiku)-(\d+)(?:-(\d{1,2}))?(?:-\d{8}|-latest)?")


def finish_reason(stop_reason: str | None) -> FinishReason:
    """Maps Anthropic's stop_reason to :class:`FinishReason`."""
    return _STOP.get(stop_reason or "", FinishReason.UNSPECIFIED)


def native_structured_output(model: str) -> bool:
    """Whether ``model`` takes ``output_config.format`` (Claude 4.5 and later, by its id or alias)."""
    match = _FAMILY.fullmatch(model)
    return match is not None and (int(match[1]), int(match[2] or 0)) >= (4, 5)


@dataclass(frozen=True, slots=True)
class AnswerTool:
    """The forced tool that carries structured output: its input is the answer's text.

    Attributes:
        name: The tool's name in the request.
        wrapped: The schema's root is not an object, so the answer is the input's ``value``.
    """

    name: str
    wrapped: bool = False


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for k, v in node.items() if k != "$ref"))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def _recursive(schema: Mapping[str, Any]) -> bool:
    """A ``$ref`` cycle (the native parameter refuses recursive schemas; a tool takes them)."""
    if "#" in _refs(dict(schema)):
        return True
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            defs[f"#/{key}/{name}"] = sub
    graph = {name: {r for r in _refs(sub) if r in defs} for name, sub in defs.items()}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph[start])

    return any(reaches(name, name, {name}) for name in graph)


def native_schema(fmt: ResponseFormat) -> dict[str, Any] | None:
    """The ``output_config.format`` schema for ``fmt``, or None when the native parameter cannot take it."""
    schema = dict(fmt.schema or {})
    if fmt.type != "json_schema" or schema.get("type") != "object" or _recursive(schema):
        return None
    try:
        return anthropic.transform_schema(schema)
    except (ValueError, TypeError, AttributeError):  # outside the subset the SDK can rewrite
        return None


def answer_tool(fmt: ResponseFormat, taken: set[str]) -> tuple[AnswerTool, dict[str, Any]]:
    """The forced tool for ``fmt`` (named after the schema, or ``json_answer``; never one of ``taken``)."""
    base = fmt.name if fmt.type == "json_schema" and fmt.name else ANSWER_TOOL
    name, n = base, 2
    while name in taken:
        name, n = f"{base[:60]}_{n}", n + 1
    schema = dict(fmt.schema or {}) if fmt.type == "json_schema" else {"type": "object"}
    wrapped = schema.get("type") != "object"
    if wrapped:
        # A tool's input is an object: carry the answer as its "value", definitions kept at the root.
        defs = {k: schema.pop(k) for k in ("$defs", "definitions") if k in schema}
        schema = {"type": "object", "properties": {"value": schema}, "required": ["value"], **defs}
    tool = {"name": name, "description": ANSWER_TOOL_DESCRIPTION, "input_schema": schema}
    return AnswerTool(name, wrapped), tool


# ----------------------------------------------------------------------------- answers


def answer_finish(stop_reason: str | None, answer: AnswerTool | None, called: bool) -> FinishReason:
    """``tool_use`` is TOOL_CALLS only when a caller's tool was called, not just the answer tool."""
    if stop_reason == "tool_use" and answer is not None and not called:
        return FinishReason.STOP
    return finish_reason(stop_reason)


def _answer_text(text: str, tool: AnswerTool) -> str:
    if not tool.wrapped:
        return text or "{}"
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return text  # not JSON: the router's schema check says so
    if isinstance(value, dict) and "value" in value:
        return json.dumps(value["value"])
    return text


class StreamDecoder:
    """Stream events -> text deltas and :class:`ToolCallDelta` fragments.

    A tool call's ``index`` counts ``tool_use`` blocks only: Anthropic's block ``index`` also
    counts text blocks, and mapping it straight through shifts every call after a text block
    (the bug LiteLLM #5231 and Bifrost #3511 shipped). The answer tool's input (structured
    output without the native parameter) streams as text instead, and text blocks next to it are
    left out so the answer stays one JSON document.
    """

    def __init__(self, answer: AnswerTool | None) -> None:
        self.answer = answer
        self._calls: dict[int, int] = {}  # content block index -> tool call index
        self._answer_blocks: dict[int, list[str]] = {}

    def block_start(self, index: int, block: Any) -> list[StreamItem]:
        """A ``content_block_start``: the first fragment of a tool call (id and name)."""
        if block.type != "tool_use":
            return []
        if self.answer is not None and block.name == self.answer.name:
            self._answer_blocks[index] = []
            return []
        n = self._calls[index] = len(self._calls)
        return [ToolCallDelta(n, id=block.id, name=block.name)]

    def block_delta(self, index: int, delta: Any) -> list[StreamItem]:
        """A ``content_block_delta``: text, or a fragment of a call's JSON arguments."""
        if delta.type == "text_delta":
            return [delta.text] if delta.text and self.answer is None else []
        if delta.type != "input_json_delta":
            return []  # thinking, signatures, citations: not part of the answer
        fragment: str = delta.partial_json
        if index in self._answer_blocks:
            self._answer_blocks[index].append(fragment)
            return [fragment] if fragment and not self.answer_wrapped else []
        if index not in self._calls:
            raise ValueError(f"input_json_delta for block {index}, which is not a tool_use block")
        return [ToolCallDelta(self._calls[index], arguments=fragment)] if fragment else []

    def block_stop(self, index: int) -> list[StreamItem]:
        """A ``content_block_stop``: the answer tool's input, when it could not stream as it came."""
        fragments = self._answer_blocks.pop(index, None)
        if fragments is None or self.answer is None:
            return []
        text = "".join(fragments)
        if self.answer.wrapped or not text:
            return [_answer_text(text, self.answer)]
        return []

    @property
    def answer_wrapped(self) -> bool:
        """The answer is the input's ``value``, so it is sent whole at the block's end."""
        return self.answer is not None and self.answer.wrapped

    def finish(self, stop_reason: str | None) -> FinishReason:
        """The answer's finish reason (see :func:`answer_finish`)."""
        return answer_finish(stop_reason, self.answer, bool(self._calls))
