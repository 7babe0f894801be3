"""Whole answers from streamed pieces, and the check that "structured" output is structured.

Both RPCs are served from a provider's stream. :class:`Assembler` collects the pieces of one
answer: text deltas and tool-call fragments (by ``index``: the first fragment of a call carries
its id and name, later ones only ``arguments``), so the unary answer and the stream's final
message say the same thing as the deltas did. A call whose arguments never came is ``{}``.

:func:`schema_violation` checks an answer against the caller's ``response_format`` with the
``jsonschema`` library: the gateway never returns unvalidated structured output as OK (a provider
may ignore the request silently, as vLLM does with a parameter it no longer reads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema  # type: ignore[import-untyped]

from service.providers.base import ResponseFormat, ToolCall, ToolCallDelta


@dataclass(slots=True)
class _Call:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class Assembler:
    """Collects one answer's text and tool calls from its stream items."""

    __slots__ = ("_calls", "_text")

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, _Call] = {}

    def text_delta(self, text: str) -> None:
        """Appends text."""
        self._text.append(text)

    def tool_delta(self, delta: ToolCallDelta) -> None:
        """Adds a tool-call fragment to the call at its index."""
        call = self._calls.setdefault(delta.index, _Call())
        if delta.id and not call.id:
            call.id = delta.id
        if delta.name and not call.name:
            call.name = delta.name
        if delta.arguments:
            call.arguments.append(delta.arguments)

    @property
    def text(self) -> str:
        """The answer's text so far."""
        return "".join(self._text)

    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The calls in index order; empty arguments become ``{}``."""
        return tuple(
            ToolCall(c.id or f"call_{i}", c.name, "".join(c.arguments) or "{}") for i, c in sorted(self._calls.items())
        )


def schema_violation(text: str, fmt: ResponseFormat | None, tool_calls: tuple[ToolCall, ...] = ()) -> str | None:
    """Why ``text`` does not satisfy ``fmt`` (None when it does, or when no format was asked).

    An answer that is a tool call instead of text is not judged: the caller asked the model to
    use tools and it did.
    """
    if fmt is None or (tool_calls and not text.strip()):
        return None
    try:
        value: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"the answer is not JSON ({exc.msg} at character {exc.pos})"
    if fmt.type == "json_object":
        return None if isinstance(value, dict) else f"the answer is JSON but not an object ({type(value).__name__})"
    try:
        jsonschema.validate(value, dict(fmt.schema or {}))
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return f"the answer does not fit the schema at {where}: {exc.message}"
    except jsonschema.SchemaError as exc:  # validation rejects bad schemas first; this is a backstop
        return f"the schema itself is invalid: {exc.message}"
    return None
