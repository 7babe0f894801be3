"""The client library's agent options (issue 13) over real gRPC servers: tools, tool choice,
structured output (a schema dict or a pydantic model, ``.parsed``), images from files and URLs,
metadata, tool turns, tool-call deltas in streams, ``list_models`` and the CLI's flags.

Request shapes are checked on the scripted server of tests/client_helpers.py (it records what it
received); behaviour through the real gateway with scripted providers (exact tool-call streams) and,
marked e2e, on the embedded llama.cpp model.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from inference.v1 import inference_pb2 as pb
from pydantic import BaseModel, ConfigDict, Field

from clients import (
    AsyncInferenceClient,
    ChatResult,
    InferenceClient,
    ModelRoute,
    RetryPolicy,
    Tool,
    ToolCall,
    ToolCallDelta,
    UnavailableError,
    image_url,
)
from clients.cli import main
from service.providers.base import (
    ChatRequest,
    FinishReason,
    HealthReport,
    ImagePart,
    StreamEnd,
    StreamItem,
    TextPart,
    Usage,
)
from service.providers.base import ToolCallDelta as ProviderDelta
from tests.client_helpers import Failure, ScriptedServer
from tests.conftest import RunningGateway, make_settings, start_gateway, stop_gateway

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16  # the payload is not checked; the first bytes name the type
NO_RETRY = RetryPolicy(max_retries=0)
# The embedded model on a loaded 2-core machine can miss the gateway's 20 s first-token timeout:
# UNAVAILABLE before any text is what the client retries, as it would for any caller.
E2E_RETRY = RetryPolicy(max_retries=2, initial_delay_s=0.5)


class Weather(BaseModel):
    """A structured answer the tests ask for."""

    city: str = Field(max_length=20)
    temp_c: int = Field(ge=-50, le=60)


class City(BaseModel):
    """Tool parameters given as a pydantic model."""

    city: str = Field(max_length=20)


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
}


class Scripted:
    """A provider that streams ``items`` (text and tool-call fragments) and records each request."""

    kind = "fake"
    endpoint = "http://scripted.invalid"
    scale_to_zero = False
    image_input = True

    def __init__(self, name: str, items: Sequence[str | ProviderDelta]) -> None:
        self.name = name
        self.items = list(items)
        self.default_model = "m"
        self.requests: list[ChatRequest] = []

    async def start(self) -> None:
        pass

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        self.requests.append(request)
        for item in self.items:
            yield item
        calls = any(isinstance(i, ProviderDelta) for i in self.items)
        yield StreamEnd("id-1", "m", FinishReason.TOOL_CALLS if calls else FinishReason.STOP, Usage(5, 7))

    async def check_health(self, timeout_s: float) -> HealthReport:
        return HealthReport(ok=True, latency_s=0.0)

    async def aclose(self) -> None:
        pass


# Text, then two calls whose fragments interleave; the second call never gets arguments.
TOOL_STREAM: list[str | ProviderDelta] = [
    "Checking. ",
    ProviderDelta(0, id="call_a", name="get_weather"),
    ProviderDelta(1, id="call_b", name="get_time"),
    ProviderDelta(0, arguments='{"city": '),
    ProviderDelta(0, arguments='"Paris"}'),
]
ASSEMBLED = [ToolCall("call_a", "get_weather", '{"city": "Paris"}'), ToolCall("call_b", "get_time", "{}")]
TOOLS = [WEATHER_TOOL, Tool("get_time", "Local time in a city", City)]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as running:
        yield running


async def gateway(*items: str | ProviderDelta) -> tuple[RunningGateway, Scripted]:
    provider = Scripted("vastai", items)
    return await start_gateway(make_settings(), [provider]), provider


def test_sync_and_async_clients_have_the_same_new_calls() -> None:
    for name in ("list_models", "chat", "chat_stream"):
        sync, aio = getattr(InferenceClient, name), getattr(AsyncInferenceClient, name)
        assert inspect.signature(sync).parameters.keys() == inspect.signature(aio).parameters.keys(), name
    from clients import ChatStream, SyncChatStream

    assert hasattr(ChatStream, "events") and hasattr(SyncChatStream, "events")


def agent_options(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "dot.png").write_bytes(PNG)
    (tmp_path / "photo.jpg").write_bytes(JPEG)
    return {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [ToolCall("call_a", "get_weather", '{"city":"Paris"}')]},
            ToolCall("call_a", "get_weather", "{}").result({"sky": "clear"}),
            {"role": "user", "content": "Compare:", "images": ["https://example.com/a.png"]},
        ],
        "tools": [
            WEATHER_TOOL,
            {"type": "function", "function": {"name": "openai_shaped", "parameters": {"type": "object"}}},
            Tool("get_time", "Local time", City, strict=True),
        ],
        "tool_choice": "get_time",
        "response_format": Weather,
        "metadata": {"team": "support", "ticket": "42"},
        "images": [tmp_path / "dot.png", str(tmp_path / "photo.jpg")],
    }


def check_agent_request(request: pb.ChatRequest | pb.ChatStreamRequest) -> None:
    m = request.messages
    assert [x.role for x in m] == [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_TOOL, pb.ROLE_USER, pb.ROLE_USER]
    assert [(c.id, c.name, c.arguments) for c in m[1].tool_calls] == [("call_a", "get_weather", '{"city":"Paris"}')]
    assert (m[2].tool_call_id, m[2].content) == ("call_a", '{"sky": "clear"}')
    assert [p.WhichOneof("part") for p in m[3].parts] == ["text", "image_url"] and not m[3].content
    assert m[3].parts[1].image_url.url == "https://example.com/a.png"
    # The prompt's images: read from disk, typed by their bytes, sent as base64 data URLs.
    urls = [p.image_url.url for p in m[4].parts[1:]]
    assert m[4].parts[0].text == "What is in these?"
    assert urls == [
        f"data:image/png;base64,{base64.b64encode(PNG).decode()}",
        f"data:image/jpeg;base64,{base64.b64encode(JPEG).decode()}",
    ]
    assert [t.name for t in request.tools] == ["get_weather", "openai_shaped", "get_time"]
    assert request.tools[0].parameters["properties"]["city"]["maxLength"] == 20
    assert request.tools[2].strict and request.tools[2].parameters["properties"]["city"]["maxLength"] == 20
    assert request.tool_choice.function_name == "get_time"
    schema = request.response_format.json_schema
    assert schema.name == "Weather" and schema.strict and schema.schema["properties"]["temp_c"]["maximum"] == 60
    assert dict(request.metadata) == {"team": "support", "ticket": "42"}


async def test_every_agent_option_builds_the_same_request_in_both_clients(
    server: ScriptedServer, tmp_path: Path
) -> None:
    options = agent_options(tmp_path)
    async with AsyncInferenceClient(server.target) as client:
        await client.chat("What is in these?", **options)
        async with client.chat_stream("What is in these?", **options) as stream:
            _ = [t async for t in stream]

    def sync_calls() -> None:
        with InferenceClient(server.target) as client:
            client.chat("What is in these?", **options)
            with client.chat_stream("What is in these?", **options) as stream:
                list(stream)

    await asyncio.to_thread(sync_calls)
    calls = server.servicer.calls()
    assert [c.method for c in calls] == ["Chat", "ChatStream", "Chat", "ChatStream"]
    for received in calls:
        check_agent_request(received.request)
    assert calls[0].request == calls[2].request and calls[1].request == calls[3].request


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("auto", pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO)),
        ("none", pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE)),
        ("required", pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
        ("get_weather", pb.ToolChoice(function_name="get_weather")),
    ],
)
def test_tool_choice_modes_and_names(server: ScriptedServer, given: str, expected: pb.ToolChoice) -> None:
    with InferenceClient(server.target) as client:
        client.chat("hi", tools=[WEATHER_TOOL], tool_choice=given)
    assert server.servicer.calls()[0].request.tool_choice == expected


@pytest.mark.parametrize(
    ("given", "name", "strict"),
    [
        ({"title": "My answer!", "type": "object"}, "My_answer", True),
        ({"type": "object"}, "response", True),
        (
            {"type": "json_schema", "json_schema": {"name": "pick", "schema": {"type": "object"}, "strict": False}},
            "pick",
            False,
        ),
    ],
)
def test_response_format_forms(server: ScriptedServer, given: dict[str, Any], name: str, strict: bool) -> None:
    with InferenceClient(server.target) as client:
        client.chat("hi", response_format=given)
        client.chat("hi", response_format="json_object")
    first, second = (c.request.response_format for c in server.servicer.calls())
    assert (first.json_schema.name, first.json_schema.strict, first.json_schema.schema["type"]) == (
        name,
        strict,
        "object",
    )
    assert second.WhichOneof("format") == "json_object"


def test_images_that_cannot_be_sent_are_refused_before_any_call(server: ScriptedServer, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    webp = tmp_path / "pic.bin"
    webp.write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
    assert image_url(webp).startswith("data:image/webp;base64,")  # by its bytes, whatever its name
    with InferenceClient(server.target) as client:
        with pytest.raises(ValueError, match="https: URLs only"):
            client.chat("hi", images=["http://example.com/a.png"])
        with pytest.raises(ValueError, match="not PNG, JPEG, GIF or WebP"):
            client.chat("hi", images=[text])
        with pytest.raises(FileNotFoundError):
            client.chat("hi", images=[tmp_path / "missing.png"])
        with pytest.raises(ValueError, match="unknown message key"):
            client.chat(messages=[{"role": "user", "content": "x", "image": "a.png"}])
    assert server.servicer.calls() == []


@pytest.mark.parametrize("client_kind", ["sync", "async"])
async def test_a_stream_is_not_retried_once_a_tool_call_arrived(server: ScriptedServer, client_kind: str) -> None:
    """Retrying after a tool-call fragment would splice two answers, as after text."""
    server.servicer.deltas = []
    server.servicer.tool_deltas = [pb.ToolCallDelta(index=0, id="call_a", name="get_weather")]
    server.servicer.fail_after_deltas = Failure("UNAVAILABLE", "every provider failed")
    retry = RetryPolicy(max_retries=3, initial_delay_s=0.01)

    def sync_stream() -> list[Any]:
        with InferenceClient(server.target, retry=retry) as client, client.chat_stream("hi") as stream:
            return list(stream.events())

    with pytest.raises(UnavailableError):
        if client_kind == "sync":
            await asyncio.to_thread(sync_stream)
        else:
            async with AsyncInferenceClient(server.target, retry=retry) as client:
                async with client.chat_stream("hi") as stream:
                    _ = [e async for e in stream.events()]
    assert len(server.servicer.calls("ChatStream")) == 1


async def test_tool_calls_stream_as_events_and_assemble_async() -> None:
    running, provider = await gateway(*TOOL_STREAM)
    try:
        async with AsyncInferenceClient(running.target, retry=NO_RETRY) as client:
            result = await client.chat("Weather in Paris?", tools=TOOLS, metadata={"run": "r1"})
            assert result.finish_reason == "tool_calls" and result.tool_calls == ASSEMBLED
            assert result.tool_calls[0].args() == {"city": "Paris"} and result.tool_calls[1].args() == {}
            assert provider.requests[-1].metadata == (("run", "r1"),)

            seen_partial: list[list[ToolCall]] = []
            async with client.chat_stream("Weather in Paris?", tools=TOOLS) as stream:
                events = []
                async for event in stream.events():
                    events.append(event)
                    seen_partial.append(stream.tool_calls)
            async with client.chat_stream("Weather in Paris?", tools=TOOLS) as text_stream:
                texts = [t async for t in text_stream]
    finally:
        await stop_gateway(running)
    assert events == [
        "Checking. ",
        ToolCallDelta(0, "call_a", "get_weather", ""),
        ToolCallDelta(1, "call_b", "get_time", ""),
        ToolCallDelta(0, "", "", '{"city": '),
        ToolCallDelta(0, "", "", '"Paris"}'),
    ]
    assert seen_partial[3] == [ToolCall("call_a", "get_weather", '{"city": '), ToolCall("call_b", "get_time", "")]
    assert stream.final is not None and stream.final.tool_calls == ASSEMBLED and stream.tool_calls == ASSEMBLED
    assert stream.final.finish_reason == "tool_calls" and stream.text == "Checking. "
    assert texts == ["Checking. "]  # text iteration sees the text only
    assert text_stream.final is not None and text_stream.final.tool_calls == ASSEMBLED


async def test_tool_calls_stream_as_events_and_assemble_sync() -> None:
    running, _ = await gateway(*TOOL_STREAM)

    def calls() -> tuple[ChatResult, list[Any], ChatResult | None]:
        with InferenceClient(running.target, retry=NO_RETRY) as client:
            result = client.chat("Weather in Paris?", tools=TOOLS, tool_choice="required")
            with client.chat_stream("Weather in Paris?", tools=TOOLS) as stream:
                events = list(stream.events())
            return result, events, stream.final

    try:
        result, events, final = await asyncio.to_thread(calls)
    finally:
        await stop_gateway(running)
    assert result.tool_calls == ASSEMBLED and result.finish_reason == "tool_calls"
    assert [e for e in events if isinstance(e, str)] == ["Checking. "]
    assert [e.index for e in events if isinstance(e, ToolCallDelta)] == [0, 1, 0, 0]
    assert final is not None and final.tool_calls == ASSEMBLED


async def test_a_tool_result_goes_back_as_a_tool_turn() -> None:
    running, provider = await gateway(*TOOL_STREAM)
    try:
        async with AsyncInferenceClient(running.target, retry=NO_RETRY) as client:
            history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
            first = await client.chat(messages=history, tools=TOOLS)
            history.append(first.as_message())
            history += [call.result({"city": call.args().get("city"), "sky": "clear"}) for call in first.tool_calls]
            provider.items = ["Sunny in Paris."]
            answer = await client.chat(messages=history, tools=TOOLS)
    finally:
        await stop_gateway(running)
    assert answer.text == "Sunny in Paris." and answer.tool_calls == []
    sent = provider.requests[-1].messages
    assert [m.role for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [(c.id, c.arguments) for c in sent[1].tool_calls] == [("call_a", '{"city": "Paris"}'), ("call_b", "{}")]
    assert [(m.tool_call_id, json.loads(m.content)) for m in sent[2:]] == [
        ("call_a", {"city": "Paris", "sky": "clear"}),
        ("call_b", {"city": None, "sky": "clear"}),
    ]


async def test_parsed_is_the_pydantic_model_and_a_schema_miss_is_an_error() -> None:
    running, provider = await gateway('{"city": "Paris", ', '"temp_c": 21}')
    try:
        async with AsyncInferenceClient(running.target, retry=NO_RETRY) as client:
            result = await client.chat("Weather?", response_format=Weather)
            async with client.chat_stream("Weather?", response_format=Weather) as stream:
                _ = [t async for t in stream]
            plain = await client.chat("Weather?", response_format=Weather.model_json_schema())
            sent = provider.requests[-1].response_format
            provider.items = ['{"city": "Paris", "temp_c": "warm"}']
            with pytest.raises(UnavailableError) as info:
                async with client.chat_stream("Weather?", response_format=Weather) as bad:
                    _ = [t async for t in bad]
    finally:
        await stop_gateway(running)
    assert result.parsed == Weather(city="Paris", temp_c=21) and result.parsed is result.parsed
    assert stream.final is not None and stream.final.parsed == Weather(city="Paris", temp_c=21)
    assert plain.parsed == {"city": "Paris", "temp_c": 21}
    assert sent is not None and sent.type == "json_schema" and sent.schema["properties"]["temp_c"]["maximum"] == 60
    assert info.value.reason == "SCHEMA_VIOLATION" and bad.final is None
    assert ChatResult("i", "m", "", "stop", result.usage, "p", _parse=json.loads).parsed is None


async def test_images_from_a_file_reach_the_provider_as_a_typed_data_url(tmp_path: Path) -> None:
    (tmp_path / "dot.png").write_bytes(PNG)
    running, provider = await gateway("a dot")
    try:
        async with AsyncInferenceClient(running.target, retry=NO_RETRY) as client:
            await client.chat("What is this?", images=[tmp_path / "dot.png", "https://example.com/b.jpg"])
    finally:
        await stop_gateway(running)
    parts = provider.requests[-1].messages[0].parts
    assert parts[0] == TextPart("What is this?")
    assert [p.url[:22] for p in parts[1:] if isinstance(p, ImagePart)] == [
        "data:image/png;base64,",
        "https://example.com/b.",
    ]
    assert isinstance(parts[1], ImagePart) and base64.b64decode(parts[1].data()[1]) == PNG


async def test_list_models_in_both_clients(tmp_path: Path) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('default = "small"\n[models.small]\nvastai = "Qwen/0.5B"\n[models.big]\nvastai = "Qwen/7B"\n')
    provider = Scripted("vastai", ["x"])
    running = await start_gateway(make_settings(models_file=str(catalogue)), [provider])

    def sync_list() -> Any:
        with InferenceClient(running.target) as client:
            return client.list_models()

    try:
        async with AsyncInferenceClient(running.target) as client:
            listed = await client.list_models()
        assert await asyncio.to_thread(sync_list) == listed
    finally:
        await stop_gateway(running)
    assert [(m.name, m.routes) for m in listed] == [
        ("small", [ModelRoute("vastai", "Qwen/0.5B")]),
        ("big", [ModelRoute("vastai", "Qwen/7B")]),
    ]


# --- the CLI ---------------------------------------------------------------------------------


async def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, argv, {})
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_models_tools_and_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS[:1]))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(Weather.model_json_schema()))
    (tmp_path / "dot.png").write_bytes(PNG)
    running, provider = await gateway(*TOOL_STREAM)
    target = ["--target", running.target, "--retries", "0"]
    try:
        code, out, err = await run_cli(["models", *target], capsys)
        assert (code, out) == (0, "m (default): vastai=m\n"), err
        code, out, _ = await run_cli(["models", "--json", *target], capsys)
        assert json.loads(out) == [{"name": "m", "routes": [{"provider": "vastai", "model": "m"}]}]

        argv = ["chat", "Weather?", "--tool", str(tools), "--tool-choice", "get_weather", *target]
        code, out, err = await run_cli(
            [*argv, "--metadata", "team=support", "--image", str(tmp_path / "dot.png")], capsys
        )
        assert code == 0, err
        assert out == 'Checking. \ntool call call_a: get_weather {"city": "Paris"}\ntool call call_b: get_time {}\n'
        sent = provider.requests[-1]
        assert [t.name for t in sent.tools] == ["get_weather"] and sent.tool_choice is not None
        assert sent.metadata == (("team", "support"),) and sent.messages[0].has_images

        code, out, _ = await run_cli([*argv, "--stream", "--json"], capsys)
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[0] == {"delta": {"text": "Checking. "}}
        assert lines[1] == {
            "delta": {"tool_calls": [{"index": 0, "id": "call_a", "name": "get_weather", "arguments": ""}]}
        }
        assert lines[-1]["final"]["tool_calls"][0] == {
            "id": "call_a",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        }

        provider.items = ['{"city": "Paris", ', '"temp_c": 21}']
        code, out, err = await run_cli(["chat", "Weather?", "--schema", str(schema), *target], capsys)
        assert code == 0 and json.loads(out) == {"city": "Paris", "temp_c": 21} and out.startswith("{\n"), err
        code, out, _ = await run_cli(["chat", "Weather?", "--schema", str(schema), "--json", *target], capsys)
        assert json.loads(out)["parsed"] == {"city": "Paris", "temp_c": 21}
        assert provider.requests[-1].response_format is not None
    finally:
        await stop_gateway(running)


@pytest.mark.parametrize(
    ("flag", "content", "needle"),
    [
        ("--schema", "{not json", "is not JSON"),
        ("--schema", "[1]", "must hold a JSON Schema object"),
        ("--tool", '[{"description": "no name"}]', "not a tool"),
        ("--image", "plain text", "not PNG, JPEG, GIF or WebP"),
        ("--metadata", None, "use KEY=VALUE"),
    ],
)
def test_cli_bad_agent_flags_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, content: str | None, needle: str
) -> None:
    path = tmp_path / "file"
    if content is not None:
        path.write_text(content)
    value = str(path) if content is not None else "novalue"
    code = main(["chat", "hi", flag, value, "--target", "127.0.0.1:1"], {})  # no call is made
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and needle in err, err


# --- end to end on the embedded model ---------------------------------------------------------


class Pick(BaseModel):
    """Small and bounded, so llama.cpp's grammar keeps the tiny model inside it."""

    model_config = ConfigDict(extra="forbid")
    colour: str = Field(max_length=12)
    count: int = Field(ge=0, le=9)


@pytest.mark.e2e
async def test_embedded_model_structured_output_and_tool_round_trip(local_gateway: RunningGateway) -> None:
    async with AsyncInferenceClient(local_gateway.target, timeout_s=180, retry=E2E_RETRY) as client:
        picked = await client.chat("Name a colour and a number.", response_format=Pick, max_tokens=64, temperature=0)
        assert isinstance(picked.parsed, Pick) and picked.provider == "local"

        history: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
        async with client.chat_stream(
            messages=history, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=96, temperature=0
        ) as stream:
            events = [e async for e in stream.events()]
        assert stream.final is not None and stream.final.finish_reason == "tool_calls"
        (call,) = stream.final.tool_calls
        assert call.name == "get_weather" and isinstance(call.args()["city"], str)
        fragments = [e for e in events if isinstance(e, ToolCallDelta)]
        assert fragments[0] == ToolCallDelta(0, call.id, call.name, fragments[0].arguments)
        assert {f.index for f in fragments} == {0} and "".join(f.arguments for f in fragments) == call.arguments

        history += [stream.final.as_message(), call.result({"sky": "clear", "temp_c": 21})]
        answer = await client.chat(messages=history, tools=[WEATHER_TOOL], max_tokens=16)
        assert answer.provider == "local" and answer.finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.e2e
async def test_embedded_model_from_the_blocking_client_and_cli(
    local_gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def forced_call() -> ChatResult:
        with InferenceClient(local_gateway.target, timeout_s=180, retry=E2E_RETRY) as client:
            return client.chat("Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="get_weather", max_tokens=96)

    result = await asyncio.to_thread(forced_call)
    ((call),) = result.tool_calls
    assert result.finish_reason == "tool_calls" and call.name == "get_weather" and "city" in call.args()

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(Pick.model_json_schema()))
    target = ["--target", local_gateway.target, "--retries", "2", "--timeout", "180"]
    code, out, err = await run_cli(["chat", "Name a colour and a number.", "--schema", str(schema), *target], capsys)
    assert code == 0, err
    Pick.model_validate_json(out)
    code, out, err = await run_cli(["models", *target], capsys)
    assert code == 0 and out.startswith("SmolLM2-135M-Instruct (default): local="), (out, err)
