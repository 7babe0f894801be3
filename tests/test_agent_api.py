"""The agent API at the gateway's own layers (issue 13): validation, assembly, schema checks, images,
the catalogue and ListModels, over a real gRPC server with scripted providers (the providers' wire
formats are tested against their stand-ins in tests/test_agent_*.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inference.v1 import inference_pb2 as pb

from service.errors import ConfigError
from service.providers.base import (
    ChatRequest,
    FinishReason,
    HealthReport,
    StreamEnd,
    StreamItem,
    ToolCallDelta,
    Usage,
)
from service.routing.assemble import Assembler, schema_violation
from service.routing.catalogue import load_catalogue
from tests.conftest import make_settings, start_gateway, stop_gateway

USER = pb.Message(role=pb.ROLE_USER, content="What is the weather in Paris?")


class Scripted:
    """A provider that streams the given items and records every request it was sent."""

    kind = "fake"
    endpoint = "http://scripted.invalid"
    scale_to_zero = False

    def __init__(
        self, name: str, items: Sequence[str | ToolCallDelta], *, model: str = "m", image_input: bool = True
    ) -> None:
        self.name = name
        self.items = list(items)
        self.default_model = model
        self.image_input = image_input
        self.requests: list[ChatRequest] = []

    async def start(self) -> None:
        pass

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        self.requests.append(request)
        calls = any(isinstance(i, ToolCallDelta) for i in self.items)
        for item in self.items:
            yield item
        reason = FinishReason.TOOL_CALLS if calls else FinishReason.STOP
        yield StreamEnd("id-1", request.model or self.default_model, reason, Usage(5, 7))

    async def check_health(self, timeout_s: float) -> HealthReport:
        return HealthReport(ok=True, latency_s=0.0)

    async def aclose(self) -> None:
        pass


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


WEATHER = pb.Tool(
    name="get_weather",
    description="Current weather",
    parameters=struct(
        {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}
    ),
)
TOOL_STREAM: list[str | ToolCallDelta] = [
    "Let me check. ",
    ToolCallDelta(0, id="call_a", name="get_weather"),
    ToolCallDelta(1, id="call_b", name="get_time"),
    ToolCallDelta(0, arguments='{"city": '),
    ToolCallDelta(1, arguments=""),
    ToolCallDelta(0, arguments='"Paris"}'),
]


async def test_tool_calls_stream_as_deltas_and_assemble_into_the_final_message() -> None:
    provider = Scripted("vastai", TOOL_STREAM)
    running = await start_gateway(make_settings(), [provider])
    try:
        request = pb.ChatStreamRequest(messages=[USER], tools=[WEATHER])
        messages = [m async for m in running.stub.ChatStream(request)]
        deltas = [m.delta for m in messages if m.HasField("delta")]
        assert deltas[0].text == "Let me check. "
        fragments = [(d.index, d.id, d.name, d.arguments) for m in deltas for d in m.tool_calls]
        assert fragments == [
            (0, "call_a", "get_weather", ""),
            (1, "call_b", "get_time", ""),
            (0, "", "", '{"city": '),
            (1, "", "", ""),
            (0, "", "", '"Paris"}'),
        ]
        final = messages[-1].final
        assert final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert final.message.content == "Let me check. "
        assert [(c.id, c.name, c.arguments) for c in final.message.tool_calls] == [
            ("call_a", "get_weather", '{"city": "Paris"}'),
            ("call_b", "get_time", "{}"),  # empty arguments become {}
        ]
        answer = await running.stub.Chat(pb.ChatRequest(messages=[USER], tools=[WEATHER]))
        assert answer.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert [(c.id, c.arguments) for c in answer.message.tool_calls] == [
            ("call_a", '{"city": "Paris"}'),
            ("call_b", "{}"),
        ]
        sent = provider.requests[-1]
        assert sent.tools[0].name == "get_weather"
        assert sent.tools[0].parameters["properties"]["city"]["maxLength"] == 40  # an int, not 40.0
        assert isinstance(sent.tools[0].parameters["properties"]["city"]["maxLength"], int)
    finally:
        await stop_gateway(running)


async def test_a_tool_result_conversation_reaches_the_provider_whole() -> None:
    provider = Scripted("vastai", ["It is sunny."])
    running = await start_gateway(make_settings(), [provider])
    try:
        conversation = [
            USER,
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.ToolCall(id="call_a", name="get_weather", arguments='{"city": "Paris"}')],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_a", content='{"sky": "clear"}'),
        ]
        choice = pb.ToolChoice(function_name="get_weather")
        answer = await running.stub.Chat(pb.ChatRequest(messages=conversation, tools=[WEATHER], tool_choice=choice))
        assert answer.message.content == "It is sunny." and not answer.message.tool_calls
        sent = provider.requests[-1]
        assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
        assert sent.messages[1].tool_calls[0].arguments == '{"city": "Paris"}'
        assert sent.messages[2].tool_call_id == "call_a" and sent.tool_choice is not None
        assert sent.tool_choice.function == "get_weather"
    finally:
        await stop_gateway(running)


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temp_c": {"type": "integer", "maximum": 60}},
    "required": ["city", "temp_c"],
    "additionalProperties": False,
}


def schema_format() -> pb.ResponseFormat:
    return pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name="weather", schema=struct(SCHEMA), strict=True))


async def test_structured_output_that_does_not_fit_falls_back_for_chat() -> None:
    bad = Scripted("modal", ['{"city": "Paris", "temp_c": "warm"}'])
    good = Scripted("vastai", ['{"city": "Paris", ', '"temp_c": 21}'])
    running = await start_gateway(make_settings(), [bad, good])
    try:
        answer = await running.stub.Chat(pb.ChatRequest(messages=[USER], response_format=schema_format()))
        assert answer.provider == "vastai" and json.loads(answer.message.content) == {"city": "Paris", "temp_c": 21}
        assert [(a.provider, a.error_reason) for a in answer.attempts] == [
            ("modal", "SCHEMA_VIOLATION"),
            ("vastai", ""),
        ]
        assert "temp_c" in answer.attempts[0].error_message
        sent = bad.requests[-1].response_format
        assert sent is not None and sent.type == "json_schema" and sent.name == "weather" and sent.strict
        # A structured-output miss says nothing about the provider's health.
        health = await running.stub.Health(pb.HealthRequest())
        assert health.providers[0].state == pb.PROVIDER_STATE_HEALTHY
    finally:
        await stop_gateway(running)


async def test_structured_output_that_does_not_fit_ends_a_stream_precisely() -> None:
    running = await start_gateway(make_settings(), [Scripted("modal", ["not ", "json"])])
    try:
        request = pb.ChatStreamRequest(messages=[USER], response_format=schema_format())
        call = running.stub.ChatStream(request)
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for message in call:
                received.append(message)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(info.value)
        assert status is not None
        error = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(error)
        assert error.reason == "SCHEMA_VIOLATION" and error.metadata["provider"] == "modal"
        assert all(m.HasField("delta") for m in received)  # never a final for an answer that does not fit
    finally:
        await stop_gateway(running)


async def test_json_object_must_be_an_object() -> None:
    running = await start_gateway(make_settings(), [Scripted("modal", ["[1, 2]"]), Scripted("vastai", ['{"a": 1}'])])
    try:
        fmt = pb.ResponseFormat(json_object=pb.JsonObjectFormat())
        answer = await running.stub.Chat(pb.ChatRequest(messages=[USER], response_format=fmt))
        assert answer.provider == "vastai" and answer.attempts[0].error_reason == "SCHEMA_VIOLATION"
    finally:
        await stop_gateway(running)


PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


async def test_images_skip_a_provider_that_reads_text_only() -> None:
    text_only = Scripted("local", ["no"], image_input=False)
    vision = Scripted("vastai", ["a red dot"])
    running = await start_gateway(make_settings(), [text_only, vision])
    try:
        message = pb.Message(
            role=pb.ROLE_USER,
            parts=[pb.ContentPart(text="What is this?"), pb.ContentPart(image_url=pb.ImageUrl(url=PNG))],
        )
        answer = await running.stub.Chat(pb.ChatRequest(messages=[message]))
        assert answer.provider == "vastai" and text_only.requests == []
        sent = vision.requests[-1].messages[0]
        assert sent.text() == "What is this?" and sent.has_images
    finally:
        await stop_gateway(running)


async def test_images_with_no_provider_that_reads_them_say_so() -> None:
    running = await start_gateway(make_settings(), [Scripted("local", ["no"], image_input=False)])
    try:
        message = pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(image_url=pb.ImageUrl(url=PNG))])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Chat(pb.ChatRequest(messages=[message]), timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "reads images" in (info.value.details() or "") and "messages" in bad_fields(info.value)
    finally:
        await stop_gateway(running)


def bad_fields(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(exc)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    return {}


INVALID = [
    ("duplicate tool", {"tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ("bad tool name", {"tools": [pb.Tool(name="get weather")]}, "tools[0].name"),
    (
        "parameters not a schema",
        {"tools": [pb.Tool(name="t", parameters=struct({"type": "object", "properties": {"a": {"type": 5}}}))]},
        "tools[0].parameters",
    ),
    (
        "choice of a missing tool",
        {"tools": [WEATHER], "tool_choice": pb.ToolChoice(function_name="nope")},
        "tool_choice.function_name",
    ),
    ("required without tools", {"tool_choice": pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)}, "tool_choice.mode"),
    (
        "schema without a name",
        {"response_format": pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(schema=struct(SCHEMA)))},
        "response_format.json_schema.name",
    ),
    (
        "schema not a schema",
        {"response_format": pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name="x", schema=struct({"type": 3})))},
        "response_format.json_schema.schema",
    ),
    ("too many tags", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    (
        "image from http",
        {
            "messages": [
                pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(image_url=pb.ImageUrl(url="http://x/a.png"))])
            ]
        },
        "messages[0].parts[0].image_url.url",
    ),
    (
        "image with bad base64",
        {
            "messages": [
                pb.Message(
                    role=pb.ROLE_USER, parts=[pb.ContentPart(image_url=pb.ImageUrl(url="data:image/png;base64,@@"))]
                )
            ]
        },
        "messages[0].parts[0].image_url.url",
    ),
    (
        "content and parts",
        {"messages": [pb.Message(role=pb.ROLE_USER, content="x", parts=[pb.ContentPart(text="y")])]},
        "messages[0].content",
    ),
    (
        "tool result for no call",
        {"messages": [USER, pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_x", content="{}")]},
        "messages[1].tool_call_id",
    ),
    (
        "tool calls from the user",
        {"messages": [pb.Message(role=pb.ROLE_USER, content="x", tool_calls=[pb.ToolCall(id="a", name="t")])]},
        "messages[0].tool_calls",
    ),
    (
        "arguments not an object",
        {
            "messages": [
                USER,
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="a", name="t", arguments="[1]")]),
            ]
        },
        "messages[1].tool_calls[0].arguments",
    ),
]


@pytest.mark.parametrize(("case", "fields", "field"), INVALID, ids=[c[0] for c in INVALID])
async def test_agent_mistakes_are_invalid_argument_naming_the_field(
    case: str, fields: dict[str, Any], field: str
) -> None:
    provider = Scripted("vastai", ["x"])
    running = await start_gateway(make_settings(), [provider])
    try:
        request = pb.ChatRequest(**({"messages": [USER]} | fields))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Chat(request)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert field in bad_fields(info.value), bad_fields(info.value)
        assert provider.requests == []  # nothing reached a provider
    finally:
        await stop_gateway(running)


CATALOGUE = """
default = "qwen2.5-7b"

[models."qwen2.5-7b"]
modal = "Qwen/Qwen2.5-7B-Instruct"
anthropic = "claude-haiku-4-5"

[models."small"]
vastai = "Qwen/Qwen2.5-0.5B-Instruct"
"""


async def test_the_catalogue_routes_each_name_to_each_providers_own_id(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(CATALOGUE)
    modal = Scripted("modal", ["from modal"], model="Qwen/Qwen2.5-7B-Instruct")
    vast = Scripted("vastai", ["from vast"], model="Qwen/Qwen2.5-0.5B-Instruct")
    anth = Scripted("anthropic", ["from claude"], model="claude-haiku-4-5")
    running = await start_gateway(make_settings(models_file=str(models)), [modal, vast, anth])
    try:
        listed = await running.stub.ListModels(pb.ListModelsRequest())
        assert [(m.name, [(r.provider, r.model) for r in m.routes]) for m in listed.models] == [
            ("qwen2.5-7b", [("modal", "Qwen/Qwen2.5-7B-Instruct"), ("anthropic", "claude-haiku-4-5")]),
            ("small", [("vastai", "Qwen/Qwen2.5-0.5B-Instruct")]),
        ]
        # The default name: modal first, with its own id.
        answer = await running.stub.Chat(pb.ChatRequest(messages=[USER]))
        assert answer.provider == "modal" and modal.requests[-1].model == "Qwen/Qwen2.5-7B-Instruct"
        # A name: only the providers that map it, each with its own id.
        answer = await running.stub.Chat(pb.ChatRequest(messages=[USER], model="small"))
        assert answer.provider == "vastai" and vast.requests[-1].model == "Qwen/Qwen2.5-0.5B-Instruct"
        # Anything else is NOT_FOUND listing the catalogue, before any provider is asked.
        before = len(modal.requests) + len(vast.requests) + len(anth.requests)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Chat(pb.ChatRequest(messages=[USER], model="gpt-9"))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert "qwen2.5-7b" in (info.value.details() or "") and "small" in (info.value.details() or "")
        assert len(modal.requests) + len(vast.requests) + len(anth.requests) == before
    finally:
        await stop_gateway(running)


async def test_without_a_catalogue_list_models_shows_each_providers_default() -> None:
    running = await start_gateway(make_settings(), [Scripted("modal", ["x"], model="Qwen/Q"), Scripted("local", ["y"])])
    try:
        listed = await running.stub.ListModels(pb.ListModelsRequest())
        assert [(m.name, [r.provider for r in m.routes]) for m in listed.models] == [
            ("Qwen/Q", ["modal"]),
            ("m", ["local"]),
        ]
    finally:
        await stop_gateway(running)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("default = 3\n[models.a]\nmodal = 'x'", "default = 3"),
        ("[models.a]\nmodall = 'x'", "unknown providers ['modall']"),
        ("[models.a]\nmodal = ''", "non-empty model id"),
        ("default = 'b'\n[models.a]\nmodal = 'x'", "default = 'b' is not one of ['a']"),
        ("[models.a\nmodal = 'x'", "not valid TOML"),
        ("catalogue = 1", "unknown top-level keys"),
    ],
)
def test_a_bad_catalogue_names_what_to_fix(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_catalogue(str(path), ["modal", "vastai"])
    assert needle in str(info.value) and str(path) in str(info.value)


def test_assembler_and_schema_checks() -> None:
    answer = Assembler()
    answer.tool_delta(ToolCallDelta(1, id="b", name="t2"))
    answer.tool_delta(ToolCallDelta(0, id="a", name="t1", arguments='{"x":'))
    answer.tool_delta(ToolCallDelta(0, arguments="1}"))
    assert [(c.id, c.arguments) for c in answer.tool_calls()] == [("a", '{"x":1}'), ("b", "{}")]
    from service.providers.base import ResponseFormat

    fmt = ResponseFormat("json_schema", "w", SCHEMA)
    assert schema_violation('{"city": "P", "temp_c": 3}', fmt) is None
    assert "temp_c" in (schema_violation('{"city": "P", "temp_c": 99}', fmt) or "")
    assert "not JSON" in (schema_violation("Sure! {", fmt) or "")
    assert schema_violation("", fmt, answer.tool_calls()) is None  # a tool call instead of text is not judged
