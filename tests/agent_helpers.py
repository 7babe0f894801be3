"""Helpers for agent tests over a real gateway: proto builders for the agent fields, and one call
shape for both RPCs that records tool-call deltas and the assembled message as the caller saw them."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from tests.routing_helpers import Outcome, _error

# A 1x1 transparent PNG.
PNG_DATA_URL = (
    "data:image/png;base64,"
    + base64.b64encode(
        bytes.fromhex(
            "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
            "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
        )
    ).decode()
)

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "days": {"type": "integer", "minimum": 1, "maximum": 3},
        "units": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["city"],
}


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    """A dict as a ``google.protobuf.Struct`` (every number becomes a double on the way)."""
    out = struct_pb2.Struct()
    out.update(value)
    return out


def tool(name: str, parameters: dict[str, Any] | None = None, description: str = "", strict: bool = False) -> pb.Tool:
    """A ``Tool`` whose parameters are a JSON Schema object."""
    params = struct(parameters if parameters is not None else WEATHER_PARAMETERS)
    return pb.Tool(name=name, description=description, parameters=params, strict=strict)


def json_schema(schema: dict[str, Any], name: str = "answer", strict: bool = True) -> pb.ResponseFormat:
    """``response_format`` asking for JSON that fits ``schema``."""
    return pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name=name, schema=struct(schema), strict=strict))


def user(text: str = "", *images: str) -> pb.Message:
    """A user turn: plain text, or a text part followed by image parts when ``images`` are given."""
    if not images:
        return pb.Message(role=pb.ROLE_USER, content=text)
    parts = [pb.ContentPart(text=text)] if text else []
    parts += [pb.ContentPart(image_url=pb.ImageUrl(url=url)) for url in images]
    return pb.Message(role=pb.ROLE_USER, parts=parts)


@dataclass
class AgentOutcome(Outcome):
    """An :class:`Outcome` plus what the agent fields looked like to the caller."""

    tool_deltas: list[tuple[int, str, str, str]] = field(default_factory=list)  # (index, id, name, arguments)
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)  # assembled: (id, name, arguments)
    message: Any = None  # ChatResponse.message or ChatStreamFinal.message
    events: list[str] = field(default_factory=list)  # "text" / "tool" per delta, in order


async def agent_call(stub: pb_grpc.InferenceServiceStub, rpc: str, timeout: float = 30, **fields: Any) -> AgentOutcome:  # noqa: ASYNC109
    """Runs Chat or ChatStream and records every delta, the final message and any error."""
    outcome = AgentOutcome()
    try:
        if rpc == "Chat":
            r = await stub.Chat(pb.ChatRequest(**fields), timeout=timeout)
            outcome.text, outcome.provider, outcome.message = r.message.content, r.provider, r.message
            outcome.attempts = [(a.provider, a.error_reason) for a in r.attempts]
            outcome.finish_reason, outcome.usage = r.finish_reason, r.usage
        else:
            async for m in stub.ChatStream(pb.ChatStreamRequest(**fields), timeout=timeout):
                if m.HasField("delta"):
                    if m.delta.text:
                        outcome.deltas.append(m.delta.text)
                        outcome.events.append("text")
                    for d in m.delta.tool_calls:
                        outcome.tool_deltas.append((d.index, d.id, d.name, d.arguments))
                        outcome.events.append("tool")
                    continue
                outcome.finals += 1
                f = m.final
                outcome.provider, outcome.finish_reason, outcome.usage = f.provider, f.finish_reason, f.usage
                outcome.attempts = [(a.provider, a.error_reason) for a in f.attempts]
                outcome.message = f.message
            outcome.text = "".join(outcome.deltas)
    except grpc.aio.AioRpcError as exc:
        outcome.text = "".join(outcome.deltas)
        _error(outcome, exc)
        return outcome
    if outcome.message is not None:
        outcome.tool_calls = [(c.id, c.name, c.arguments) for c in outcome.message.tool_calls]
    return outcome
