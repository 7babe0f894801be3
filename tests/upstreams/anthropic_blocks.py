"""Scripted Anthropic answers with tool calls: text and ``tool_use`` blocks, as the real API sends them.

Streams: ``content_block_start`` (a text block with ``text: ""``, or a ``tool_use`` block with
``id``, ``name`` and ``input: {}``), ``ping`` after the first, ``content_block_delta`` per chunk
(``text_delta``) or fragment (``input_json_delta``; a call without input sends one empty
fragment), ``content_block_stop``, then ``message_delta`` (``stop_reason: tool_use`` when a tool
was called) and ``message_stop``. The block ``index`` counts every block, text included.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tests.upstreams.behaviours import Ok
from tests.upstreams.wire import dumps


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


@dataclass(frozen=True)
class TextBlock:
    """A text block of a scripted answer, streamed as one ``text_delta`` per chunk."""

    chunks: tuple[str, ...]

    def __init__(self, *chunks: str) -> None:
        """``TextBlock("Let me ", "look.")``."""
        object.__setattr__(self, "chunks", chunks)


@dataclass(frozen=True)
class ToolUseBlock:
    """A ``tool_use`` block: ``fragments`` are its ``input_json_delta`` pieces (none: input ``{}``,
    streamed as one empty fragment as the real API does); ``id`` defaults to a fresh ``toolu_`` id."""

    name: str
    fragments: tuple[str, ...] = ()
    id: str = ""


@dataclass(frozen=True)
class Blocks:
    """A scripted answer of text and ``tool_use`` blocks; ``stop_reason`` defaults to ``tool_use``
    when it calls a tool, else ``end_turn``."""

    blocks: tuple[TextBlock | ToolUseBlock, ...]
    stop_reason: str | None = None

    @property
    def stop(self) -> str:
        """The stop reason sent."""
        calls = any(isinstance(b, ToolUseBlock) for b in self.blocks)
        return self.stop_reason or ("tool_use" if calls else "end_turn")


def _start_block(scripted: TextBlock | ToolUseBlock) -> dict[str, Any]:
    """The block as ``content_block_start`` carries it (text empty, input ``{}``)."""
    if isinstance(scripted, TextBlock):
        return {"type": "text", "text": ""}
    call_id = scripted.id or f"toolu_01{uuid.uuid4().hex[:22]}"
    return {"type": "tool_use", "id": call_id, "name": scripted.name, "input": {}}


def unary_content(beh: Blocks) -> tuple[list[dict[str, Any]], int]:
    """The message's ``content`` and the number of chunks it is made of (its output tokens)."""
    content = []
    for scripted in beh.blocks:
        block = _start_block(scripted)
        if isinstance(scripted, TextBlock):
            block["text"] = "".join(scripted.chunks)
        else:
            block["input"] = json.loads("".join(scripted.fragments) or "{}")
        content.append(block)
    n = sum(len(b.chunks) if isinstance(b, TextBlock) else len(b.fragments) for b in beh.blocks)
    return content, n


def block_events(beh: Blocks) -> list[bytes]:
    """Every event after ``message_start``."""
    events: list[bytes] = []
    n = 0
    for i, scripted in enumerate(beh.blocks):
        events.append(
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": i, "content_block": _start_block(scripted)},
            )
        )
        if i == 0:
            events.append(_event("ping", {"type": "ping"}))
        if isinstance(scripted, TextBlock):
            deltas = [{"type": "text_delta", "text": t} for t in scripted.chunks]
        else:
            deltas = [{"type": "input_json_delta", "partial_json": f} for f in scripted.fragments or ("",)]
        for delta in deltas:
            n += 1
            events.append(_event("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}))
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": i}))
    delta = {"stop_reason": beh.stop, "stop_sequence": None}
    events.append(_event("message_delta", {"type": "message_delta", "delta": delta, "usage": {"output_tokens": n}}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


def forced_call(body: dict[str, Any], beh: Any) -> Any:
    """A plain Ok under tool_choice any/tool: the real API answers with a call; its input is ``{}``."""
    choice = body.get("tool_choice") or {}
    if not isinstance(beh, Ok) or choice.get("type") not in ("any", "tool"):
        return beh
    name = choice.get("name") or body["tools"][0]["name"]
    return Blocks((ToolUseBlock(name, ("{}",)),))


def check_script(body: dict[str, Any], beh: Blocks) -> None:
    """A script the real API could not produce for this request is the test's mistake."""
    names = {t["name"] for t in body.get("tools") or []}
    uses = [b for b in beh.blocks if isinstance(b, ToolUseBlock)]
    choice = (body.get("tool_choice") or {"type": "auto"}) if names else {"type": "none"}
    unknown = [u.name for u in uses if u.name not in names]
    assert not unknown or not names, f"script calls tools the request does not declare: {unknown}"
    kind = choice["type"]
    assert not (kind == "none" and uses), "script calls a tool under tool_choice none (or without tools)"
    if kind in ("any", "tool"):
        assert uses and isinstance(beh.blocks[0], ToolUseBlock), f"tool_choice {kind}: answers open with a call"
    if kind == "tool":
        assert all(u.name == choice["name"] for u in uses), f"tool_choice names {choice['name']!r}"
