"""The agent options as request fields: tools, tool choice, structured output, images, tool turns.

Callers write plain Python (dicts, :class:`~clients.types.Tool`, a pydantic model class, a file
path); this module is the one place those become ``inference.v1`` messages, so the sync client,
the async client and the CLI send the same thing.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from google.protobuf import struct_pb2
from inference.v1 import inference_pb2 as pb

from clients.types import Tool, ToolCall

ToolLike = Tool | Mapping[str, Any]
"""A tool: :class:`~clients.types.Tool`, ``{"name", "description", "parameters"}``, or OpenAI's
``{"type": "function", "function": {...}}``."""

ResponseFormatLike = Mapping[str, Any] | type[Any] | Literal["json_object"]
"""Structured output: a JSON Schema dict, a pydantic model class, ``"json_object"``, or OpenAI's
``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``."""

ImageLike = str | os.PathLike[str]
"""An image: a file path (sent inline as a base64 data URL), an ``https:`` URL or a ``data:`` URL."""

_MODES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]+")
# The gateway takes exactly these (docs/agents.md); the type comes from the bytes, not the name,
# so a mislabelled file is sent as what it is.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON-like dict as a ``google.protobuf.Struct`` (the gateway turns integral numbers back
    into integers)."""
    out = struct_pb2.Struct()
    out.update(value)
    return out


def _is_model_class(value: object) -> bool:
    return isinstance(value, type) and hasattr(value, "model_json_schema")


def _schema(value: Mapping[str, Any] | type[Any]) -> dict[str, Any]:
    if _is_model_class(value):
        schema: dict[str, Any] = value.model_json_schema()  # type: ignore[union-attr]  # checked above
        return schema
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"expected a JSON Schema dict or a pydantic model class, got {value!r}")


def tool_message(tool: ToolLike) -> pb.Tool:
    """One tool as a ``Tool`` message.

    Raises:
        TypeError: Neither a :class:`Tool` nor a mapping, or parameters that are not a schema.
        ValueError: A mapping without a name.
    """
    if isinstance(tool, Tool):
        name, description, parameters, strict = tool.name, tool.description, tool.parameters, tool.strict
    elif isinstance(tool, Mapping):
        spec = tool["function"] if isinstance(tool.get("function"), Mapping) else tool  # OpenAI's shape
        if not spec.get("name"):
            raise ValueError(f"a tool needs a name: {dict(tool)!r}")
        name, description = spec["name"], spec.get("description", "")
        parameters, strict = spec.get("parameters"), bool(spec.get("strict", False))
    else:
        raise TypeError(f"a tool is a clients.Tool or a dict, got {type(tool).__name__}")
    message = pb.Tool(name=name, description=description, strict=strict)
    if parameters is not None:
        message.parameters.CopyFrom(struct(_schema(parameters)))
    return message


def tool_choice_message(choice: str) -> pb.ToolChoice:
    """``"auto"``, ``"none"``, ``"required"``, or the name of the one function to call."""
    mode = _MODES.get(choice)
    return pb.ToolChoice(mode=mode) if mode is not None else pb.ToolChoice(function_name=choice)


def _format_name(raw: object) -> str:
    name = _NOT_NAME.sub("_", str(raw or "")).strip("_")[:64]
    return name or "response"


def response_format_message(fmt: ResponseFormatLike) -> pb.ResponseFormat:
    """Structured output as a ``ResponseFormat`` (``strict`` unless OpenAI's shape says otherwise).

    Raises:
        TypeError: Not one of the accepted forms.
    """
    if fmt == "json_object" or (isinstance(fmt, Mapping) and fmt.get("type") == "json_object"):
        return pb.ResponseFormat(json_object=pb.JsonObjectFormat())
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), Mapping):
        spec = fmt["json_schema"]  # OpenAI's shape; a JSON Schema never has type "json_schema"
        name, schema, strict = _format_name(spec.get("name")), _schema(spec["schema"]), spec.get("strict", True)
    elif isinstance(fmt, str):
        raise TypeError(f'response_format {fmt!r}: use "json_object", a JSON Schema dict or a pydantic model class')
    else:
        schema = _schema(fmt)
        name = _format_name(fmt.__name__ if isinstance(fmt, type) else schema.get("title"))
        strict = True
    return pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name=name, schema=struct(schema), strict=bool(strict)))


def result_parser(fmt: ResponseFormatLike | None) -> Callable[[str], Any] | None:
    """How :attr:`ChatResult.parsed` decodes an answer: the model class's ``model_validate_json``,
    else ``json.loads``; None without a response format."""
    if fmt is None:
        return None
    if _is_model_class(fmt):
        parse: Callable[[str], Any] = fmt.model_validate_json  # type: ignore[union-attr]  # pydantic's API
        return parse
    return json.loads


def image_url(image: ImageLike) -> str:
    """An image as the URL the gateway takes: a file is read and sent as a base64 data URL of its
    type (PNG, JPEG, GIF or WebP, read from its first bytes); ``https:`` and ``data:`` URLs as given.

    Raises:
        OSError: The file cannot be read.
        ValueError: An ``http:`` URL (only ``https:`` is fetched by providers), or a file that is
            not PNG, JPEG, GIF or WebP.
    """
    text = os.fspath(image)
    if text.startswith(("https://", "data:")):
        return text
    if text.startswith("http://"):
        raise ValueError(f"image {text!r}: providers fetch https: URLs only; pass the file instead")
    data = Path(text).read_bytes()
    media = next((m for magic, m in _MAGIC if data.startswith(magic)), None)
    if media is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        media = "image/webp"
    if media is None:
        raise ValueError(f"image {text!r} is not PNG, JPEG, GIF or WebP (the types the gateway takes)")
    return f"data:{media};base64,{base64.b64encode(data).decode('ascii')}"


def image_parts(text: str, images: Sequence[ImageLike]) -> list[pb.ContentPart]:
    """A text part (when there is text) followed by one part per image."""
    parts = [pb.ContentPart(text=text)] if text else []
    parts += [pb.ContentPart(image_url=pb.ImageUrl(url=image_url(i))) for i in images]
    return parts


def tool_call_message(call: ToolCall | Mapping[str, Any]) -> pb.ToolCall:
    """An assistant turn's call: :class:`ToolCall`, ``{"id", "name", "arguments"}`` (arguments as
    JSON text or a dict), or OpenAI's ``{"id", "function": {"name", "arguments"}}``."""
    if isinstance(call, ToolCall):
        return pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments)
    spec = call["function"] if isinstance(call.get("function"), Mapping) else call
    arguments = spec.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return pb.ToolCall(id=call.get("id", ""), name=spec.get("name", ""), arguments=arguments)
