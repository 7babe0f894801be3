"""Tools, structured output and images on Anthropic, over a real gateway.

Each test starts a gateway (real gRPC server) whose Anthropic provider drives the real ``anthropic``
SDK against the stand-in (``tests.upstreams.anthropic_server``), which checks requests the way the
real API does (``tests.upstreams.anthropic_rules``) and answers with scripted content blocks
(``tests.upstreams.anthropic_blocks``). What the stand-in received is the evidence of what the
gateway sends; what the gRPC caller saw is the evidence of how answers are read back.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inference.v1 import inference_pb2 as pb

from service.providers.anthropic_structured import ANSWER_TOOL_DESCRIPTION
from tests.conftest import RunningGateway, start_gateway, stop_gateway
from tests.routing_helpers import chain_settings
from tests.upstreams import FakeAnthropic, FakeOpenAI, Ok
from tests.upstreams import anthropic_rules as rules
from tests.upstreams.anthropic_server import Blocks, TextBlock, ToolUseBlock

RPCS = ["Chat", "ChatStream"]
HAIKU_45 = "claude-haiku-4-5"  # takes output_config (structured outputs)
OPUS_41 = "claude-opus-4-1"  # does not: structured output travels as a forced tool call
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    """A dict as a protobuf Struct."""
    s = struct_pb2.Struct()
    s.update(value)
    return s


def user(text: str) -> pb.Message:
    """A user message."""
    return pb.Message(role=pb.ROLE_USER, content=text)


TOOLS = [
    pb.Tool(name="get_weather", description="Weather in a city", parameters=struct(WEATHER)),
    pb.Tool(name="get_time", description="The time now"),
]


@dataclass
class Seen:
    """What the gRPC caller saw, for either RPC."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    text: str = ""
    deltas: list[str] = field(default_factory=list)
    tool_deltas: list[tuple[int, str, str, str]] = field(default_factory=list)
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    finish: int = 0
    provider: str = ""
    attempts: list[tuple[str, str]] = field(default_factory=list)
    reason: str = ""
    details: str = ""


async def ask(gw: RunningGateway, rpc: str, *messages: pb.Message, **fields: Any) -> Seen:
    """Runs Chat or ChatStream with ``messages`` (a default user turn when none)."""
    fields["messages"] = list(messages) or [user("What is the weather in Paris?")]
    seen = Seen()
    try:
        if rpc == "Chat":
            r = await gw.stub.Chat(pb.ChatRequest(**fields), timeout=10)
            message, seen.finish, seen.provider, attempts = r.message, r.finish_reason, r.provider, r.attempts
        else:
            message, attempts = pb.Message(), []
            async for m in gw.stub.ChatStream(pb.ChatStreamRequest(**fields), timeout=10):
                if m.HasField("final"):
                    message, seen.finish, seen.provider = m.final.message, m.final.finish_reason, m.final.provider
                    attempts = m.final.attempts
                    continue
                if m.delta.text:
                    seen.deltas.append(m.delta.text)
                seen.tool_deltas += [(d.index, d.id, d.name, d.arguments) for d in m.delta.tool_calls]
        seen.text = message.content
        seen.tool_calls = [(c.id, c.name, c.arguments) for c in message.tool_calls]
        seen.attempts = [(a.provider, a.error_reason) for a in attempts]
    except grpc.aio.AioRpcError as exc:
        seen.code, seen.details = exc.code(), exc.details() or ""
        status = rpc_status.from_call(exc)
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                seen.reason = info.reason
    return seen


@pytest.fixture
def ant() -> Iterator[FakeAnthropic]:
    """The stand-in; Claude 4.5 models have structured outputs, others do not."""
    with FakeAnthropic(api_key="sk-ant-test", structured_outputs=[HAIKU_45, "claude-sonnet-4-6"]) as srv:
        yield srv
    assert srv.errors == []  # a failed script assertion or a stand-in crash


async def gateway_for(srv: FakeAnthropic, model: str = HAIKU_45, **overrides: Any) -> RunningGateway:
    """A gateway whose only provider is Anthropic (``model`` by default)."""
    return await start_gateway(chain_settings(anthropic=srv, anthropic_model=model, **overrides))


@pytest.fixture
async def gw(ant: FakeAnthropic) -> AsyncIterator[RunningGateway]:
    """A gateway on the stand-in, serving Claude Haiku 4.5."""
    running = await gateway_for(ant)
    yield running
    await stop_gateway(running)


def sent(srv: FakeAnthropic) -> dict[str, Any]:
    """The body of the last Messages request the stand-in received."""
    body: dict[str, Any] = srv.chat_requests[-1].json
    return body


# ----------------------------------------------------------------------------- tools and tool calls


@pytest.mark.parametrize("rpc", RPCS)
async def test_tool_calls_after_a_text_block_are_numbered_from_zero(
    ant: FakeAnthropic, gw: RunningGateway, rpc: str
) -> None:
    # Anthropic's block indexes are 0 (text), 1, 2; the calls are 0 and 1 (LiteLLM #5231, Bifrost #3511).
    ant.enqueue(
        Blocks(
            (
                TextBlock("Let me ", "check."),
                ToolUseBlock("get_weather", ('{"city":', ' "Paris"}'), id="toolu_01A"),
                ToolUseBlock("get_time", ('{"tz": ', '"CET"}'), id="toolu_01B"),
            )
        )
    )
    seen = await ask(gw, rpc, tools=TOOLS)
    assert seen.code == grpc.StatusCode.OK, seen.details
    assert seen.finish == pb.FINISH_REASON_TOOL_CALLS
    assert seen.text == "Let me check."
    assert seen.tool_calls == [
        ("toolu_01A", "get_weather", '{"city": "Paris"}'),
        ("toolu_01B", "get_time", '{"tz": "CET"}'),
    ]
    if rpc == "ChatStream":
        assert seen.deltas == ["Let me ", "check."]
        assert seen.tool_deltas == [
            (0, "toolu_01A", "get_weather", ""),
            (0, "", "", '{"city":'),
            (0, "", "", ' "Paris"}'),
            (1, "toolu_01B", "get_time", ""),
            (1, "", "", '{"tz": '),
            (1, "", "", '"CET"}'),
        ]
    body = sent(ant)
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER},
        {"name": "get_time", "description": "The time now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body  # Anthropic's default is auto


@pytest.mark.parametrize("rpc", RPCS)
async def test_a_call_without_input_has_empty_object_arguments(
    ant: FakeAnthropic, gw: RunningGateway, rpc: str
) -> None:
    ant.enqueue(Blocks((ToolUseBlock("get_time", id="toolu_01T"),)))  # one empty input_json_delta
    seen = await ask(gw, rpc, tools=TOOLS)
    assert seen.tool_calls == [("toolu_01T", "get_time", "{}")]
    assert seen.finish == pb.FINISH_REASON_TOOL_CALLS
    if rpc == "ChatStream":
        assert seen.tool_deltas == [(0, "toolu_01T", "get_time", "")]  # no empty fragment relayed


@pytest.mark.parametrize(
    ("choice", "anthropic_choice"),
    [
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO), {"type": "auto"}),
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED), {"type": "any"}),
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE), {"type": "none"}),
        (pb.ToolChoice(function_name="get_time"), {"type": "tool", "name": "get_time"}),
    ],
    ids=["auto", "required", "none", "function"],
)
async def test_tool_choice_is_sent_as_anthropic_spells_it(
    ant: FakeAnthropic, gw: RunningGateway, choice: pb.ToolChoice, anthropic_choice: dict[str, Any]
) -> None:
    seen = await ask(gw, "ChatStream", tools=TOOLS, tool_choice=choice)
    assert sent(ant)["tool_choice"] == anthropic_choice
    # The stand-in answers a forcing choice with a call, as the real API must.
    forced = anthropic_choice["type"] in ("any", "tool")
    assert seen.finish == (pb.FINISH_REASON_TOOL_CALLS if forced else pb.FINISH_REASON_STOP)
    assert bool(seen.tool_calls) is forced


async def test_tool_results_go_back_as_one_user_message_of_tool_result_blocks(
    ant: FakeAnthropic, gw: RunningGateway
) -> None:
    calls = [
        pb.ToolCall(id="toolu_01A", name="get_weather", arguments='{"city": "Paris"}'),
        pb.ToolCall(id="toolu_01B", name="get_time", arguments=""),
    ]
    history = [
        pb.Message(role=pb.ROLE_SYSTEM, content="be brief"),
        user("Weather and time in Paris?"),
        pb.Message(role=pb.ROLE_ASSISTANT, content="Let me check.", tool_calls=calls),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="toolu_01A", content="18 C, sunny"),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="toolu_01B", content="12:00"),
    ]
    ant.enqueue(Ok(tokens=["Sunny, ", "noon."]))
    seen = await ask(gw, "Chat", *history, tools=TOOLS)
    assert (seen.code, seen.text, seen.finish) == (grpc.StatusCode.OK, "Sunny, noon.", pb.FINISH_REASON_STOP)
    body = sent(ant)
    assert body["system"] == "be brief"
    assert body["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18 C, sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_01B", "content": "12:00"},
            ],
        },
    ]


async def test_history_anthropic_would_refuse_is_made_acceptable(ant: FakeAnthropic, gw: RunningGateway) -> None:
    # Ids minted elsewhere (not [A-Za-z0-9_-]), a call never answered, a user turn after the
    # results (merged behind them), a later turn without tools: each a 400 if sent as given.
    calls = [
        pb.ToolCall(id="functions.get_weather:0", name="get_weather", arguments='{"city": "Oslo"}'),
        pb.ToolCall(id="call 2", name="get_time", arguments="{}"),
    ]
    history = [
        user("Weather in Oslo?"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=calls),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="functions.get_weather:0", content="-3 C"),
        user("And now summarise."),
    ]
    seen = await ask(gw, "ChatStream", *history)  # no tools on this turn
    assert seen.code == grpc.StatusCode.OK, seen.details
    body = sent(ant)
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "functions_get_weather_0", "name": "get_weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "functions_get_weather_0", "content": "-3 C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": "(no result was given for this call)",
                    "is_error": True,
                },
                {"type": "text", "text": "And now summarise."},
            ],
        },
    ]
    # Tool blocks need tools: the ones the history names, none of them callable now.
    assert body["tools"] == [
        {"name": "get_weather", "input_schema": {"type": "object"}},
        {"name": "get_time", "input_schema": {"type": "object"}},
    ]
    assert body["tool_choice"] == {"type": "none"}


# ----------------------------------------------------------------------------- structured output


def schema_format(schema: dict[str, Any], name: str = "weather") -> pb.ResponseFormat:
    """A json_schema response format."""
    return pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name=name, schema=struct(schema)))


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "temp": {"type": "integer"}},
    "required": ["city"],
}


@pytest.mark.parametrize("rpc", RPCS)
async def test_claude_4_5_gets_the_native_structured_output_parameter(
    ant: FakeAnthropic, gw: RunningGateway, rpc: str
) -> None:
    ant.enqueue(Ok(tokens=['{"city": ', '"Paris", "temp": 18}']))
    seen = await ask(gw, rpc, response_format=schema_format(CITY))
    assert seen.code == grpc.StatusCode.OK, seen.details
    assert seen.text == '{"city": "Paris", "temp": 18}'
    body = sent(ant)
    # The API's subset (the SDK's transform_schema): additionalProperties false on every object,
    # maxLength (which the API does not take) moved into a description; the gateway checks it.
    assert body["output_config"] == {
        "format": {
            "type": "json_schema",
            "schema": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "{maxLength: 20}"},
                    "temp": {"type": "integer"},
                },
                "additionalProperties": False,
                "required": ["city"],
            },
        }
    }
    assert "tools" not in body and "tool_choice" not in body


@pytest.mark.parametrize("rpc", RPCS)
async def test_a_model_without_it_answers_through_a_forced_tool_call(ant: FakeAnthropic, rpc: str) -> None:
    gw = await gateway_for(ant, model=OPUS_41)
    try:
        ant.enqueue(Blocks((ToolUseBlock("weather", ('{"city": ', '"Paris"}')),)))
        seen = await ask(gw, rpc, response_format=schema_format(CITY))
    finally:
        await stop_gateway(gw)
    assert seen.code == grpc.StatusCode.OK, seen.details
    assert (seen.text, seen.tool_calls, seen.finish) == ('{"city": "Paris"}', [], pb.FINISH_REASON_STOP)
    if rpc == "ChatStream":
        assert seen.deltas == ['{"city": ', '"Paris"}']  # streamed as it came, as text
        assert seen.tool_deltas == []
    body = sent(ant)
    assert "output_config" not in body  # the stand-in refuses it for this model
    assert body["tools"] == [{"name": "weather", "description": ANSWER_TOOL_DESCRIPTION, "input_schema": CITY}]
    assert body["tool_choice"] == {"type": "tool", "name": "weather", "disable_parallel_tool_use": True}


async def test_the_forced_tool_leaves_the_callers_tools_callable(ant: FakeAnthropic) -> None:
    gw = await gateway_for(ant, model=OPUS_41)
    try:
        ant.enqueue(Blocks((ToolUseBlock("get_weather", ('{"city": "Rome"}',), id="toolu_01W"),)))
        seen = await ask(gw, "ChatStream", tools=TOOLS, response_format=schema_format(CITY))
    finally:
        await stop_gateway(gw)
    body = sent(ant)
    assert [t["name"] for t in body["tools"]] == ["get_weather", "get_time", "weather"]
    assert body["tool_choice"] == {"type": "any"}  # a caller's tool, or the answer
    # The model called a caller's tool: that is the answer, not judged against the schema.
    assert (seen.code, seen.finish) == (grpc.StatusCode.OK, pb.FINISH_REASON_TOOL_CALLS)
    assert seen.tool_deltas[0] == (0, "toolu_01W", "get_weather", "")


@pytest.mark.parametrize("model", [HAIKU_45, OPUS_41])
async def test_json_object_asks_for_any_object_through_a_forced_tool(ant: FakeAnthropic, model: str) -> None:
    # The native parameter insists on additionalProperties: false, so it cannot say "any object".
    gw = await gateway_for(ant, model=model)
    try:
        ant.enqueue(Blocks((ToolUseBlock("json_answer", ('{"anything": [1, 2]}',)),)))
        seen = await ask(gw, "Chat", response_format=pb.ResponseFormat(json_object=pb.JsonObjectFormat()))
    finally:
        await stop_gateway(gw)
    assert (seen.code, seen.text) == (grpc.StatusCode.OK, '{"anything": [1, 2]}')
    body = sent(ant)
    assert body["tools"] == [
        {"name": "json_answer", "description": ANSWER_TOOL_DESCRIPTION, "input_schema": {"type": "object"}}
    ]
    assert body["tool_choice"]["name"] == "json_answer"
    assert "output_config" not in body


@pytest.mark.parametrize("rpc", RPCS)
async def test_a_schema_whose_root_is_not_an_object_is_carried_as_value(
    ant: FakeAnthropic, gw: RunningGateway, rpc: str
) -> None:
    numbers = {"type": "array", "items": {"type": "integer"}}
    ant.enqueue(Blocks((ToolUseBlock("numbers", ('{"value": [1, ', "2, 3]}")),)))
    seen = await ask(gw, rpc, response_format=schema_format(numbers, name="numbers"))
    assert (seen.code, seen.text) == (grpc.StatusCode.OK, "[1, 2, 3]")
    assert sent(ant)["tools"][0]["input_schema"] == {
        "type": "object",
        "properties": {"value": numbers},
        "required": ["value"],
    }


async def test_a_schema_violating_answer_is_the_text_anthropic_sent(ant: FakeAnthropic) -> None:
    # The router judges; the Anthropic side's job is to hand it exactly what the model wrote.
    with FakeOpenAI() as vast:
        settings = chain_settings(
            vast=vast, anthropic=ant, anthropic_model=HAIKU_45, provider_order=("anthropic", "vastai")
        )
        gw = await start_gateway(settings)
        try:
            vast.enqueue(Ok(tokens=['{"city": "Rome"}']))
            ant.enqueue(Ok(tokens=['{"town": ', "1}"]))
            chat = await ask(gw, "Chat", response_format=schema_format(CITY))
            ant.enqueue(Ok(tokens=['{"town": ', "1}"]))
            stream = await ask(gw, "ChatStream", response_format=schema_format(CITY))
        finally:
            await stop_gateway(gw)
    assert (chat.code, chat.provider, chat.text) == (grpc.StatusCode.OK, "vastai", '{"city": "Rome"}')
    assert chat.attempts[0] == ("anthropic", "SCHEMA_VIOLATION")
    assert stream.deltas == ['{"town": ', "1}"]
    assert (stream.code, stream.reason) == (grpc.StatusCode.UNAVAILABLE, "SCHEMA_VIOLATION")


# ----------------------------------------------------------------------------- images


def data_url(raw: bytes, media_type: str = "image/png") -> str:
    """A base64 data URL."""
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


async def test_images_are_sent_as_url_and_base64_blocks(ant: FakeAnthropic, gw: RunningGateway) -> None:
    parts = [
        pb.ContentPart(text="Compare these."),
        pb.ContentPart(image_url=pb.ImageUrl(url="https://example.com/cat.jpg")),
        pb.ContentPart(image_url=pb.ImageUrl(url=data_url(PNG))),
    ]
    seen = await ask(gw, "ChatStream", pb.Message(role=pb.ROLE_USER, parts=parts))
    assert seen.code == grpc.StatusCode.OK, seen.details
    assert sent(ant)["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()},
                },
            ],
        }
    ]


async def test_an_image_that_is_not_its_declared_type_is_the_callers_mistake(
    ant: FakeAnthropic, gw: RunningGateway
) -> None:
    parts = [pb.ContentPart(image_url=pb.ImageUrl(url=data_url(JPEG, "image/png")))]
    seen = await ask(gw, "Chat", pb.Message(role=pb.ROLE_USER, parts=parts))
    assert seen.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Image does not match the provided media type image/png" in seen.details


# ----------------------------------------------------------------------------- the stand-in's rules

TOOL = {"name": "get_time", "input_schema": {"type": "object"}}
ASK = {"role": "user", "content": "hi"}
CALL = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}]}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"}
OPEN = {"type": "object", "properties": {"a": {"type": "string"}}}


def png_source(raw: bytes = PNG, media_type: str = "image/png") -> dict[str, Any]:
    """A base64 image source."""
    return {"type": "base64", "media_type": media_type, "data": base64.b64encode(raw).decode()}


def fmt(schema: dict[str, Any]) -> dict[str, Any]:
    """An output_config asking for ``schema``."""
    return {"format": {"type": "json_schema", "schema": schema}}


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("dotted tool name", {"tools": [{**TOOL, "name": "a.b"}]}, "tools.0.custom.name: String should match pattern"),
    ("duplicate tools", {"tools": [TOOL, TOOL]}, rules.UNIQUE_TOOLS),
    ("schema not an object", {"tools": [{**TOOL, "input_schema": {"type": "string"}}]}, "input_schema.type"),
    ("invalid schema", {"tools": [{**TOOL, "input_schema": {"type": "object", "required": 3}}]}, "draft 2020-12"),
    ("strict on a model without", {"model": OPUS_41, "tools": [{**TOOL, "strict": True}]}, "strict tool use"),
    ("strict, open object", {"tools": [{**TOOL, "input_schema": OPEN, "strict": True}]}, rules.ADDITIONAL_PROPERTIES),
    ("unknown forced tool", {"tools": [TOOL], "tool_choice": {"type": "tool", "name": "x"}}, "no tool named 'x'"),
    ("any without tools", {"tool_choice": {"type": "any"}}, "needs tools"),
    ("tool blocks, no tools", {"messages": [ASK, CALL, {"role": "user", "content": [RESULT]}]}, rules.TOOLS_REQUIRED),
    ("unanswered call", {"tools": [TOOL], "messages": [ASK, CALL, ASK]}, "ids were found without `tool_result`"),
    (
        "result not first",
        {
            "tools": [TOOL],
            "messages": [ASK, CALL, {"role": "user", "content": [{"type": "text", "text": "x"}, RESULT]}],
        },
        "Did not find 1 `tool_result` block(s) at the beginning",
    ),
    (
        "stray result",
        {"tools": [TOOL], "messages": [{"role": "user", "content": [RESULT]}]},
        "unexpected `tool_use_id` found in `tool_result` blocks: toolu_1",
    ),
    (
        "foreign call id",
        {"tools": [TOOL], "messages": [ASK, {"role": "assistant", "content": [{**CALL["content"][0], "id": "a:1"}]}]},
        "tool_use.id: String should match pattern",
    ),
    ("empty text", {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, rules.EMPTY_TEXT),
    ("blank text", {"messages": [{"role": "user", "content": [{"type": "text", "text": " \n"}]}]}, rules.BLANK_TEXT),
    ("empty message", {"messages": [{"role": "user", "content": ""}]}, rules.NON_EMPTY),
    (
        "media type",
        {"messages": [{"role": "user", "content": [{"type": "image", "source": png_source(media_type="image/bmp")}]}]},
        "media_type: Input should be 'image/jpeg'",
    ),
    (
        "bytes not the media type",
        {"messages": [{"role": "user", "content": [{"type": "image", "source": png_source(JPEG)}]}]},
        "Image does not match the provided media type image/png",
    ),
    ("open object", {"output_config": fmt(OPEN)}, f"output_config.format.schema: {rules.ADDITIONAL_PROPERTIES}"),
    (
        "length constraint",
        {"output_config": fmt({"type": "string", "maxLength": 3})},
        "'maxLength' is not supported",
    ),
    ("no structured outputs", {"model": OPUS_41, "output_config": fmt({"type": "string"})}, "not supported for model"),
]


@pytest.fixture
async def sdk(ant: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The real SDK on the stand-in."""
    async with anthropic.AsyncAnthropic(base_url=ant.base_url, api_key="sk-ant-test", max_retries=0) as client:
        yield client


def create(extra: dict[str, Any]) -> dict[str, Any]:
    """``messages.create`` arguments."""
    return {"model": HAIKU_45, "max_tokens": 8, "messages": [ASK], **extra}


@pytest.mark.parametrize(("extra", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
async def test_stand_in_refuses_what_the_real_api_refuses(
    sdk: anthropic.AsyncAnthropic, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        await sdk.messages.create(**create(extra))
    assert message in err.value.body["error"]["message"]  # type: ignore[index]


async def test_stand_in_accepts_what_the_real_api_accepts(sdk: anthropic.AsyncAnthropic) -> None:
    image_turn = [
        {"type": "image", "source": png_source()},
        {"type": "image", "source": {"type": "url", "url": "https://x.y/z.png"}},
    ]
    accepted: list[dict[str, Any]] = [
        {
            "tools": [TOOL],
            "messages": [ASK, CALL, {"role": "user", "content": [RESULT, {"type": "text", "text": "and?"}]}],
        },
        {"tools": [TOOL], "tool_choice": {"type": "none"}},
        {"tools": [{**TOOL, "strict": True, "input_schema": anthropic.transform_schema(OPEN)}]},
        {"messages": [{"role": "user", "content": image_turn}]},
        {
            "output_config": fmt(
                anthropic.transform_schema({**OPEN, "properties": {"a": {"type": "string", "maxLength": 3}}})
            )
        },
    ]
    for extra in accepted:
        assert (await sdk.messages.create(**create(extra))).stop_reason == "end_turn"


async def test_stand_in_refuses_a_script_the_real_api_could_not_answer() -> None:
    with FakeAnthropic() as srv:
        async with anthropic.AsyncAnthropic(base_url=srv.base_url, api_key="k", max_retries=0) as client:
            srv.enqueue(Blocks((ToolUseBlock("undeclared"),)))
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(**create({"tools": [TOOL]}))
        assert "does not declare" in srv.errors[0]
