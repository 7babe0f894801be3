"""Validation and translation of the agent fields: tools, tool choice, structured output, message
parts (text and images), tool calls in the conversation, and the caller's metadata tags.

Every mistake becomes a FieldViolation naming the field and what to fix; nothing here knows HTTP.
JSON Schemas (tool parameters, response formats) are checked with ``jsonschema`` so a schema the
gateway could not validate answers against is refused up front, not discovered after a provider
has been paid for an answer.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped]
from google.protobuf import json_format, struct_pb2
from inference.v1 import inference_pb2 as pb

from service.errors import FieldViolation
from service.providers.base import (
    ContentPart,
    ImagePart,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
)

MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
MAX_ARGUMENT_CHARS = 100_000
MAX_METADATA = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 256
MAX_PARTS = 64
MAX_URL_CHARS = 8192
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DATA_URL = re.compile(r"data:image/(png|jpeg|gif|webp);base64,(.+)", re.DOTALL)
_MODES = {
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON, integral numbers as ints (``maxItems: 3``, not ``3.0``).

    ``google.protobuf.Struct`` stores every number as a double; schemas want integers where the
    caller wrote them (a JSON Schema ``maxItems: 3.0`` is rejected by strict validators).
    """

    def fix(node: Any) -> Any:
        if isinstance(node, float) and node.is_integer() and abs(node) < 2**53:
            return int(node)
        if isinstance(node, dict):
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    result: dict[str, Any] = fix(json_format.MessageToDict(value))
    return result


def _schema_problem(schema: dict[str, Any]) -> str | None:
    try:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return f"is not a valid JSON Schema at {where}: {exc.message}"
    return None


def tools(request: Any, bad: list[FieldViolation]) -> tuple[Tool, ...]:
    """``tools``: unique names, valid JSON Schema objects as parameters."""
    out: list[Tool] = []
    if len(request.tools) > MAX_TOOLS:
        bad.append(FieldViolation("tools", f"at most {MAX_TOOLS} tools, got {len(request.tools)}"))
        return ()
    seen: set[str] = set()
    for i, t in enumerate(request.tools):
        field = f"tools[{i}]"
        if not _NAME.fullmatch(t.name):
            bad.append(FieldViolation(f"{field}.name", "must be 1 to 64 letters, digits, _ or -"))
            continue
        if t.name in seen:
            bad.append(FieldViolation(f"{field}.name", f"{t.name!r} is given twice; tool names must be unique"))
            continue
        seen.add(t.name)
        parameters = struct_to_dict(t.parameters) if t.HasField("parameters") else {"type": "object", "properties": {}}
        problem = _schema_problem(parameters)
        if problem:
            bad.append(FieldViolation(f"{field}.parameters", problem))
            continue
        if parameters.get("type", "object") != "object":
            bad.append(FieldViolation(f"{field}.parameters", "must describe an object (type: object)"))
            continue
        out.append(Tool(t.name, t.description, parameters, t.strict))
    return tuple(out)


def tool_choice(request: Any, names: set[str], bad: list[FieldViolation]) -> ToolChoice | None:
    """``tool_choice``: a mode, or the name of one of the request's tools."""
    if not request.HasField("tool_choice"):
        return None
    which = request.tool_choice.WhichOneof("choice")
    if which == "function_name":
        name = request.tool_choice.function_name
        if name not in names:
            bad.append(FieldViolation("tool_choice.function_name", f"{name!r} is not one of the request's tools"))
            return None
        return ToolChoice(function=name)
    if which == "mode":
        mode = _MODES.get(request.tool_choice.mode)
        if mode is None:
            return None  # UNSPECIFIED: the provider's default
        if mode == "required" and not names:
            bad.append(FieldViolation("tool_choice.mode", "TOOL_CHOICE_MODE_REQUIRED needs at least one tool"))
            return None
        return ToolChoice(mode=mode)  # type: ignore[arg-type]  # the dict's values are the Literal's
    return None


def response_format(request: Any, bad: list[FieldViolation]) -> ResponseFormat | None:
    """``response_format``: json_object, or json_schema with a name and a valid schema."""
    if not request.HasField("response_format"):
        return None
    which = request.response_format.WhichOneof("format")
    if which == "json_object":
        return ResponseFormat("json_object")
    if which != "json_schema":
        return None
    fmt = request.response_format.json_schema
    ok = True
    if not _NAME.fullmatch(fmt.name):
        bad.append(FieldViolation("response_format.json_schema.name", "must be 1 to 64 letters, digits, _ or -"))
        ok = False
    if not fmt.HasField("schema"):
        bad.append(FieldViolation("response_format.json_schema.schema", "is required"))
        return None
    schema = struct_to_dict(fmt.schema)
    problem = _schema_problem(schema)
    if problem:
        bad.append(FieldViolation("response_format.json_schema.schema", problem))
        ok = False
    return ResponseFormat("json_schema", fmt.name, schema, fmt.strict) if ok else None


def metadata(request: Any, bad: list[FieldViolation]) -> tuple[tuple[str, str], ...]:
    """``metadata``: bounded tags."""
    tags = dict(request.metadata)
    if len(tags) > MAX_METADATA:
        bad.append(FieldViolation("metadata", f"at most {MAX_METADATA} entries, got {len(tags)}"))
        return ()
    for key, value in tags.items():
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            bad.append(FieldViolation("metadata", f"keys must be 1 to {MAX_METADATA_KEY_CHARS} characters"))
            return ()
        if len(value) > MAX_METADATA_VALUE_CHARS:
            bad.append(FieldViolation(f"metadata[{key}]", f"at most {MAX_METADATA_VALUE_CHARS} characters"))
            return ()
    return tuple(sorted(tags.items()))


def _image(url: str, field: str, bad: list[FieldViolation]) -> ImagePart | None:
    if len(url) > MAX_URL_CHARS and not url.startswith("data:"):
        bad.append(FieldViolation(field, f"an https URL of at most {MAX_URL_CHARS} characters"))
        return None
    if url.startswith("https://") and len(url) > len("https://"):
        return ImagePart(url)
    match = _DATA_URL.fullmatch(url)
    if match is None:
        bad.append(FieldViolation(field, "must be an https: URL or data:image/(png|jpeg|gif|webp);base64,<data>"))
        return None
    try:
        base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        bad.append(FieldViolation(field, "the data URL's payload is not valid base64"))
        return None
    return ImagePart(url)


def parts(message: Any, index: int, role: str, bad: list[FieldViolation]) -> tuple[ContentPart, ...]:
    """``messages[i].parts``: text and images (images only in user messages)."""
    out: list[ContentPart] = []
    field = f"messages[{index}].parts"
    if len(message.parts) > MAX_PARTS:
        bad.append(FieldViolation(field, f"at most {MAX_PARTS} parts, got {len(message.parts)}"))
        return ()
    if message.content:
        bad.append(FieldViolation(f"messages[{index}].content", "must be empty when parts are given (use a text part)"))
    for j, part in enumerate(message.parts):
        which = part.WhichOneof("part")
        if which == "text":
            if "\x00" in part.text:
                bad.append(FieldViolation(f"{field}[{j}].text", "must not contain NUL characters"))
            out.append(TextPart(part.text))
        elif which == "image_url":
            if role != "user":
                bad.append(FieldViolation(f"{field}[{j}].image_url", "images are allowed in ROLE_USER messages only"))
                continue
            image = _image(part.image_url.url, f"{field}[{j}].image_url.url", bad)
            if image is not None:
                out.append(image)
        else:
            bad.append(FieldViolation(f"{field}[{j}]", "must set text or image_url"))
    if out and not any(isinstance(p, ImagePart) or p.text.strip() for p in out):
        bad.append(FieldViolation(field, "must not be only empty text"))
    return tuple(out)


def tool_calls(message: Any, index: int, bad: list[FieldViolation]) -> tuple[ToolCall, ...]:
    """``messages[i].tool_calls`` (assistant turns): ids, names and JSON object arguments."""
    out: list[ToolCall] = []
    if len(message.tool_calls) > MAX_TOOL_CALLS:
        bad.append(FieldViolation(f"messages[{index}].tool_calls", f"at most {MAX_TOOL_CALLS} calls"))
        return ()
    for j, call in enumerate(message.tool_calls):
        field = f"messages[{index}].tool_calls[{j}]"
        if not call.id:
            bad.append(FieldViolation(f"{field}.id", "is required (the tool message answers it by id)"))
        if not _NAME.fullmatch(call.name):
            bad.append(FieldViolation(f"{field}.name", "must be 1 to 64 letters, digits, _ or -"))
        arguments = call.arguments or "{}"
        if len(arguments) > MAX_ARGUMENT_CHARS:
            bad.append(FieldViolation(f"{field}.arguments", f"at most {MAX_ARGUMENT_CHARS} characters"))
            continue
        try:
            parsed = json.loads(arguments)
        except ValueError:
            bad.append(FieldViolation(f"{field}.arguments", "must be JSON text (an object)"))
            continue
        if not isinstance(parsed, dict):
            bad.append(FieldViolation(f"{field}.arguments", "must be a JSON object"))
            continue
        out.append(ToolCall(call.id, call.name, arguments))
    return tuple(out)
