"""The Messages API's rules for tools, content blocks and structured output, as the stand-in enforces them.

Each check returns the real API's 400 message (``invalid_request_error``) or None. Where public
reports of the real API's answers give the wording, it is used verbatim (marked *reported*);
elsewhere the rule is from the API's documentation or the SDK's types and the wording is ours
(marked *ours*). The rules:

- tools: names ``^[a-zA-Z0-9_-]{1,128}$`` (reported), unique (reported), ``input_schema``
  required, of ``type: object`` (SDK types) and valid JSON Schema draft 2020-12 (reported);
  ``strict`` only on models with structured outputs, with ``additionalProperties: false`` on
  every object (docs).
- tool_choice: ``auto``/``any``/``tool``/``none`` (SDK types); ``tool`` names one of the tools and
  ``any``/``tool`` need tools (ours).
- content: no empty message but a final assistant one, no empty or whitespace-only text block
  (reported); image sources ``base64`` (media type jpeg/png/gif/webp, valid base64 whose bytes
  are that type) or ``url`` (http/https) (SDK types, docs); ``tool_use`` ids
  ``^[a-zA-Z0-9_-]+$`` (reported), ``input`` an object; ``tool_use`` in assistant turns and
  ``tool_result`` in user turns only.
- tool pairing (reported): tool blocks need ``tools``; every ``tool_use`` is answered by a
  ``tool_result`` in the next message, those results come first in it, and every ``tool_result``
  answers a ``tool_use`` of the message before.
- output_config.format (docs): ``type: json_schema`` with a ``schema``, only on models with
  structured outputs; every object ``additionalProperties: false`` (reported, for the beta's
  ``output_format``); no recursive schemas, no numeric, string-length or array-size constraints.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from typing import Any

import jsonschema

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")
TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")
MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# First bytes of each image type (webp: RIFF....WEBP).
_MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff", "image/gif": b"GIF8"}
UNSUPPORTED_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
UNSUPPORTED_KEYWORDS += ("minLength", "maxLength", "maxItems", "uniqueItems", "minProperties", "maxProperties")

TOOLS_REQUIRED = "Requests which include tool_use or tool_result blocks must define tools."
UNIQUE_TOOLS = "tools: Tool names must be unique."
NON_EMPTY = "all messages must have non-empty content except for the optional final assistant message"
EMPTY_TEXT = "messages: text content blocks must be non-empty"
BLANK_TEXT = "messages: text content blocks must contain non-whitespace text"
ADDITIONAL_PROPERTIES = "For 'object' type, 'additionalProperties' must be explicitly set to false"


def _schemas(node: Any) -> Iterator[dict[str, Any]]:
    """Every (sub)schema of a schema."""
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
                for sub in value.values():
                    yield from _schemas(sub)
            elif key in ("items", "additionalProperties", "not", "contains") and isinstance(value, dict):
                yield from _schemas(value)
            elif key in ("anyOf", "allOf", "oneOf", "prefixItems") and isinstance(value, list):
                for sub in value:
                    yield from _schemas(sub)


def _open_object(schema: Any) -> bool:
    return any(s.get("type") == "object" and s.get("additionalProperties") is not False for s in _schemas(schema))


def check_tools(body: dict[str, Any], structured: bool) -> str | None:
    """``tools`` and ``tool_choice``."""
    tools = body.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for i, tool in enumerate(tools):
            where = f"tools.{i}.custom"
            if not isinstance(tool, dict) or not TOOL_NAME.fullmatch(str(tool.get("name", ""))):
                return f"{where}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                return f"{where}.input_schema: Field required"
            if schema.get("type") != "object":
                return f"{where}.input_schema.type: Input should be 'object'"
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError:
                return (
                    f"{where}.input_schema: JSON schema is invalid. It must match JSON Schema draft 2020-12 "
                    "(https://json-schema.org/draft/2020-12). Learn more about tool use at "
                    "https://docs.claude.com/en/docs/tool-use."
                )
            if tool.get("strict"):
                if not structured:
                    return f"{where}.strict: strict tool use is not supported for this model"
                if _open_object(schema):
                    return f"{where}.input_schema: {ADDITIONAL_PROPERTIES}"
            names.append(tool["name"])
        if len(set(names)) < len(names):
            return UNIQUE_TOOLS
    choice = body.get("tool_choice")
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        return "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'"
    if kind in ("any", "tool") and not names:
        return f"tool_choice: type '{kind}' needs tools"
    if kind == "tool" and choice.get("name") not in names:
        return f"tool_choice.name: no tool named {choice.get('name')!r} in tools"
    return None


def _image(source: Any, where: str) -> str | None:
    if not isinstance(source, dict) or source.get("type") not in ("base64", "url"):
        return f"{where}.source: Input tag should be 'base64', 'url' or 'file'"
    if source["type"] == "url":
        url = source.get("url")
        return (
            None if isinstance(url, str) and url.startswith(("https://", "http://")) else f"{where}.source.url: invalid"
        )
    media_type = source.get("media_type")
    if media_type not in MEDIA_TYPES:
        return (
            f"{where}.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
        )
    try:
        raw = base64.b64decode(str(source.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        return f"{where}.source.base64.data: invalid base64 data"
    magic = _MAGIC.get(media_type)
    matches = raw[:4] == b"RIFF" and raw[8:12] == b"WEBP" if magic is None else raw.startswith(magic)
    return None if matches else f"{where}.source.base64.data: Image does not match the provided media type {media_type}"


def _block(block: Any, role: str, where: str) -> str | None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str) or not text:
            return EMPTY_TEXT
        return BLANK_TEXT if not text.strip() else None
    if kind == "image":
        return _image(block.get("source"), f"{where}.image")
    if kind == "tool_use":
        if role != "assistant":
            return f"{where}: tool_use blocks are only allowed in assistant messages"
        if not TOOL_ID.fullmatch(str(block.get("id", ""))):
            return f"{where}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'"
        if not isinstance(block.get("input"), dict):
            return f"{where}.tool_use.input: Input should be a valid dictionary"
        return None if isinstance(block.get("name"), str) else f"{where}.tool_use.name: Field required"
    if kind == "tool_result":
        if role != "user":
            return f"{where}: tool_result blocks are only allowed in user messages"
        content = block.get("content", "")
        if isinstance(content, list):
            for k, sub in enumerate(content):
                if not isinstance(sub, dict) or sub.get("type") not in ("text", "image"):
                    return f"{where}.tool_result.content.{k}: Input tag should be 'text' or 'image'"
        elif not isinstance(content, str):
            return f"{where}.tool_result.content: Input should be a valid string or list"
        return None if isinstance(block.get("tool_use_id"), str) else f"{where}.tool_result.tool_use_id: Field required"
    return f"{where}: Input tag {kind!r} found using 'type' does not match any of the expected tags"


def _ids(content: Any, kind: str) -> list[str]:
    if not isinstance(content, list):
        return []
    key = "id" if kind == "tool_use" else "tool_use_id"
    return [b[key] for b in content if isinstance(b, dict) and b.get("type") == kind]


def check_content(messages: list[Any], has_tools: bool) -> str | None:
    """Content blocks and the pairing of tool calls with their results."""
    tool_blocks = False
    for i, msg in enumerate(messages):
        content, role = msg.get("content"), msg.get("role")
        final_assistant = i == len(messages) - 1 and role == "assistant"
        if not content and not final_assistant:
            return f"messages.{i}: {NON_EMPTY}"
        if isinstance(content, list):
            for j, block in enumerate(content):
                if (problem := _block(block, str(role), f"messages.{i}.content.{j}")) is not None:
                    return problem
            tool_blocks = tool_blocks or bool(_ids(content, "tool_use") or _ids(content, "tool_result"))
    if tool_blocks and not has_tools:
        return TOOLS_REQUIRED
    for i, msg in enumerate(messages):
        calls = _ids(msg.get("content"), "tool_use") if msg.get("role") == "assistant" else []
        results = _ids(msg.get("content"), "tool_result")
        before = _ids(messages[i - 1].get("content"), "tool_use") if i > 0 else []
        for j, result in enumerate(results):
            if result not in before:
                return (
                    f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {result}. "
                    "Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                )
        if not calls or i == len(messages) - 1:
            continue
        after = messages[i + 1].get("content")
        missing = [c for c in calls if c not in _ids(after, "tool_result")]
        if missing:
            return (
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block in the "
                "next message."
            )
        leading = 0
        while leading < len(after) and after[leading].get("type") == "tool_result":
            leading += 1
        if leading < len(calls):
            return (
                f"messages.{i + 1}: Did not find {len(calls)} `tool_result` block(s) at the beginning of this message. "
                "Messages following `tool_use` blocks must begin with a matching number of `tool_result` blocks."
            )
    return None


def _recursive(schema: dict[str, Any]) -> bool:
    refs = {s["$ref"] for s in _schemas(schema) if isinstance(s.get("$ref"), str)}
    if "#" in refs:
        return True
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            if f"#/{key}/{name}" in {s.get("$ref") for s in _schemas(sub)}:
                return True  # a direct self-reference (enough for the stand-in)
    return False


def check_output_config(body: dict[str, Any], structured: bool) -> str | None:
    """``output_config.format``: a json_schema the model takes."""
    config = body.get("output_config")
    if config is None:
        return None
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        return None
    where = "output_config.format"
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        return f"{where}: Input should be an object with type 'json_schema' and a schema"
    if not structured:
        return f"{where}: structured outputs are not supported for model {body.get('model')}"
    schema = fmt["schema"]
    if _open_object(schema):
        return f"{where}.schema: {ADDITIONAL_PROPERTIES}"
    for sub in _schemas(schema):
        for keyword in UNSUPPORTED_KEYWORDS:
            if keyword in sub:
                return f"{where}.schema: '{keyword}' is not supported"
        if sub.get("minItems", 0) not in (0, 1):
            return f"{where}.schema: 'minItems' values other than 0 and 1 are not supported"
    return f"{where}.schema: recursive schemas are not supported" if _recursive(schema) else None
