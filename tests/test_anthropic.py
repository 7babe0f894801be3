"""Anthropic: requests the gateway accepts reach Anthropic in a shape it accepts, the stand-in
rejects what the real API rejects, and the health probe lists the served models.

The stand-in (``tests.upstreams.FakeAnthropic``) is driven by the real ``anthropic`` SDK through
``base_url``; the gateway tests go through a real gRPC server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import grpc
import httpx
import pytest
from anthropic.types import MessageParam
from inference.v1 import inference_pb2 as pb
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.errors import ProviderProtocolError
from service.providers.anthropic import (
    Adjustment,
    AnthropicProvider,
    model_aliases,
    served_with_aliases,
    to_params,
)
from service.providers.base import ChatMessage, ChatRequest, StreamEnd
from tests.conftest import start_gateway, stop_gateway
from tests.routing_helpers import call, chain_settings
from tests.upstreams import EndWithoutFinish, FakeAnthropic, MalformedSSE, Ok
from tests.upstreams.anthropic_server import BOTH_SAMPLING, TRAILING_PREFILL, WHITESPACE_STOP

KEY = "sk-ant-test"  # what chain_settings configures
USER = ChatMessage("user", "hello")
MSGS: list[MessageParam] = [{"role": "user", "content": "hello"}]
SONNET = "claude-sonnet-4-5-20250929"
HAIKU = "claude-haiku-4-5-20251001"
OPUS_4 = "claude-opus-4-20250514"


@pytest.fixture
def ant() -> Iterator[FakeAnthropic]:
    """A started stand-in requiring the gateway's test key."""
    with FakeAnthropic(api_key=KEY) as srv:
        yield srv
    assert srv.errors == []


@pytest.fixture
async def sdk(ant: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The real SDK pointed at the stand-in."""
    async with anthropic.AsyncAnthropic(base_url=ant.base_url, api_key=KEY, max_retries=0, timeout=5) as client:
        yield client


async def provider_for(srv: FakeAnthropic, **overrides: Any) -> AnthropicProvider:
    """A started AnthropicProvider on the stand-in (the caller closes it)."""
    provider = AnthropicProvider(chain_settings(anthropic=srv, **overrides))
    await provider.start()
    return provider


# ----------------------------------------------------------------------------- translation


def test_a_plain_request_is_sent_unchanged() -> None:
    request = ChatRequest((ChatMessage("system", "be brief"), USER), temperature=0.5, max_tokens=9, stop=("END",))
    params, adjustments = to_params(request, "claude-test")
    assert params == {
        "model": "claude-test",
        "max_tokens": 9,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hello"}],
        "extra_body": {"temperature": 0.5},
        "stop_sequences": ["END"],
    }
    assert adjustments == []


@pytest.mark.parametrize(
    ("request_", "sent", "adjusted"),
    [
        (
            ChatRequest((USER,), temperature=0.3, top_p=0.9),
            {"temperature": 0.3},
            [Adjustment("top_p", "dropped", "Anthropic takes temperature or top_p, not both")],
        ),
        (ChatRequest((USER,), top_p=0.9), {"top_p": 0.9}, []),
        (
            ChatRequest((USER,), temperature=1.7),
            {"temperature": 1.0},
            [Adjustment("temperature", "clamped", "1.7 is above Anthropic's range 0..1; sent 1")],
        ),
        (ChatRequest((USER,), temperature=1.0), {"temperature": 1.0}, []),
        (
            ChatRequest((USER,), stop=("\n", "END", " \t")),
            {"stop_sequences": ["END"]},
            [Adjustment("stop_sequences", "dropped", "2 whitespace-only stop sequence(s)")],
        ),
        (
            ChatRequest((USER,), stop=("\n\n",)),
            {},
            [Adjustment("stop_sequences", "dropped", "1 whitespace-only stop sequence(s)")],
        ),
        (ChatRequest((USER,), stop=(" END ",)), {"stop_sequences": [" END "]}, []),
    ],
    ids=["temperature wins over top_p", "top_p alone", "clamped", "1 kept", "stops", "only stop", "padded stop"],
)
def test_sampling_and_stops_are_made_acceptable(
    request_: ChatRequest, sent: dict[str, Any], adjusted: list[Adjustment]
) -> None:
    params, adjustments = to_params(request_, "m")
    assert {**params.get("extra_body", {}), **{k: v for k, v in params.items() if k == "stop_sequences"}} == sent
    assert adjustments == adjusted


def test_a_final_assistant_prefill_is_trimmed() -> None:
    messages = (ChatMessage("user", "name a colour "), ChatMessage("assistant", "The colour is \n"))
    params, adjustments = to_params(ChatRequest(messages), "m")
    # Only the final assistant turn must not end in whitespace; the user's text is the caller's.
    assert params["messages"] == [
        {"role": "user", "content": "name a colour "},
        {"role": "assistant", "content": "The colour is"},
    ]
    assert adjustments == [Adjustment("messages", "trimmed", "the final assistant turn (prefill) ended in whitespace")]
    earlier = (ChatMessage("assistant", "a "), ChatMessage("user", "b"))
    assert to_params(ChatRequest(earlier), "m")[0]["messages"][1:] == [
        {"role": "assistant", "content": "a "},
        {"role": "user", "content": "b"},
    ]


def test_model_aliases_follow_anthropics_naming() -> None:
    assert model_aliases(SONNET) == ["claude-sonnet-4-5"]
    assert model_aliases("claude-sonnet-4-20250514") == ["claude-sonnet-4", "claude-sonnet-4-0"]
    assert model_aliases("claude-3-7-sonnet-20250219") == ["claude-3-7-sonnet-latest"]
    assert model_aliases("claude-opus-4-6") == [] and model_aliases("gpt-4o-2024-08-06") == []
    assert served_with_aliases([SONNET, HAIKU, SONNET]) == [SONNET, HAIKU, "claude-sonnet-4-5", "claude-haiku-4-5"]


async def test_adjustments_are_events_on_the_current_span(ant: FakeAnthropic) -> None:
    """The router keeps the attempt span current while it awaits a stream's first item."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()  # a local one: the global provider belongs to test_telemetry
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider = await provider_for(ant)
    request = ChatRequest((USER, ChatMessage("assistant", "Sure, ")), temperature=2.0, top_p=0.5, stop=("\n",))
    try:
        with tracer_provider.get_tracer("t").start_as_current_span("chat claude-test"):
            stream = provider.stream(request)
            first = await anext(stream)
        rest = [item async for item in stream]
    finally:
        await provider.aclose()
    assert first == "tok0 " and isinstance(rest[-1], StreamEnd)
    for span in exporter.get_finished_spans():
        events = [(e.name, dict(e.attributes or {})) for e in span.events]
        assert [(name, a["param"], a["action"]) for name, a in events] == [
            ("request_adjusted", "messages", "trimmed"),
            ("request_adjusted", "top_p", "dropped"),
            ("request_adjusted", "temperature", "clamped"),
            ("request_adjusted", "stop_sequences", "dropped"),
        ]
        assert {a["gateway.provider"] for _, a in events} == {"anthropic"}
    assert len(exporter.get_finished_spans()) == 1
    for rec in ant.chat_requests:
        body = rec.json
        assert body["temperature"] == 1.0 and "top_p" not in body and "stop_sequences" not in body
        assert body["messages"][-1] == {"role": "assistant", "content": "Sure,"}
    assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.mark.parametrize("rpc", ["Chat", "ChatStream"])
async def test_requests_anthropic_would_reject_are_served(ant: FakeAnthropic, rpc: str) -> None:
    """Anthropic is the last resort: a valid request must not become INVALID_ARGUMENT there."""
    ant.default = Ok(tokens=["blue"])
    running = await start_gateway(chain_settings(anthropic=ant))
    messages = [
        pb.Message(role=pb.ROLE_USER, content="Name a colour."),
        pb.Message(role=pb.ROLE_ASSISTANT, content="The colour is "),
    ]
    try:
        outcome = await call(running.stub, rpc, messages=messages, temperature=1.5, top_p=0.9, stop=["\n", "END"])
    finally:
        await stop_gateway(running)
    assert outcome.code is grpc.StatusCode.OK, outcome.details
    assert outcome.provider == "anthropic" and outcome.text == "blue"
    (rec,) = ant.chat_requests
    body = rec.json
    assert body["temperature"] == 1.0 and "top_p" not in body and body["stop_sequences"] == ["END"]
    assert body["messages"][-1] == {"role": "assistant", "content": "The colour is"}


async def test_malformed_answers_are_protocol_errors(ant: FakeAnthropic) -> None:
    """Not JSON, or a message without a stop reason: the provider broke the protocol."""
    provider = await provider_for(ant)
    request = ChatRequest((USER,))
    try:
        for behaviour in (MalformedSSE(1), MalformedSSE(), EndWithoutFinish(1)):
            ant.enqueue(behaviour)
            with pytest.raises(ProviderProtocolError):
                _ = [item async for item in provider.stream(request)]
    finally:
        await provider.aclose()


# ----------------------------------------------------------------------------- the stand-in


def create_args(extra: dict[str, Any]) -> dict[str, Any]:
    """``messages.create`` arguments; sampling goes in ``extra_body`` (SDK 1.0+ has no kwarg)."""
    args: dict[str, Any] = {"model": "claude-test", "max_tokens": 5, "messages": MSGS}
    extra = dict(extra)
    sampling = {k: extra.pop(k) for k in ("temperature", "top_p") if k in extra}
    return {**args, **extra, **({"extra_body": sampling} if sampling else {})}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"temperature": 0.5, "top_p": 0.9}, BOTH_SAMPLING),
        ({"temperature": 1.5}, "temperature: range: 0..1"),
        ({"top_p": 1.5}, "top_p: range: 0..1"),
        ({"stop_sequences": ["END", "\n"]}, WHITESPACE_STOP),
        ({"stop_sequences": [""]}, WHITESPACE_STOP),
        ({"messages": [*MSGS, {"role": "assistant", "content": "Sure "}]}, TRAILING_PREFILL),
        (
            {"messages": [*MSGS, {"role": "assistant", "content": [{"type": "text", "text": "Sure\n"}]}]},
            TRAILING_PREFILL,
        ),
    ],
    ids=["both", "temperature", "top_p", "stop", "empty stop", "prefill", "prefill block"],
)
async def test_stand_in_rejects_what_the_real_api_rejects(
    ant: FakeAnthropic, sdk: anthropic.AsyncAnthropic, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        await sdk.messages.create(**create_args(extra))
    assert err.value.body["error"] == {"type": "invalid_request_error", "message": message}  # type: ignore[index]
    assert ant.pending_behaviours == 0


async def test_stand_in_accepts_what_the_real_api_accepts(ant: FakeAnthropic, sdk: anthropic.AsyncAnthropic) -> None:
    accepted: list[dict[str, Any]] = [
        {"temperature": 1},
        {"top_p": 0.9},
        {"stop_sequences": [" END ", "\nHuman:"]},
        {"messages": [*MSGS, {"role": "assistant", "content": "Sure"}]},
        {"messages": [{"role": "user", "content": "hi "}, {"role": "assistant", "content": "a "}, *MSGS]},
    ]
    for extra in accepted:
        assert (await sdk.messages.create(**create_args(extra))).stop_reason == "end_turn"
    with FakeAnthropic(exclusive_sampling=False) as claude3:
        async with anthropic.AsyncAnthropic(base_url=claude3.base_url, api_key="k", max_retries=0) as client:
            msg = await client.messages.create(**create_args({"temperature": 0.5, "top_p": 0.9}))
            assert msg.stop_reason == "end_turn"


async def test_stand_in_models_endpoints_page_like_the_real_api() -> None:
    ids = [SONNET, HAIKU, OPUS_4]
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    with FakeAnthropic(ids, api_key=KEY, aliases={"claude-haiku-4-5": HAIKU}) as srv:
        async with anthropic.AsyncAnthropic(base_url=srv.base_url, api_key=KEY, max_retries=0) as client:
            page = await client.models.list(limit=2)
            assert [m.id for m in page.data] == [SONNET, HAIKU] and page.has_more
            assert [m.id async for m in page] == ids  # the SDK follows after_id
            (record,) = (await client.models.list(limit=1, before_id=HAIKU)).data
            assert record.id == SONNET
            model = await client.models.retrieve("claude-haiku-4-5")  # an alias resolves to its id
            assert (model.id, model.display_name, model.type) == (HAIKU, "Claude Haiku 4.5", "model")
            with pytest.raises(anthropic.NotFoundError) as missing:
                await client.models.retrieve("claude-nope")
            assert missing.value.body["error"] == {"type": "not_found_error", "message": "model: claude-nope"}  # type: ignore[index]
            msg = await client.messages.create(model="claude-haiku-4-5", max_tokens=3, messages=MSGS)
            assert msg.stop_reason == "max_tokens"
        async with httpx.AsyncClient(base_url=srv.base_url, headers=headers) as http:
            body = (await http.get("/v1/models")).json()
            assert body == {"data": body["data"], "has_more": False, "first_id": SONNET, "last_id": OPUS_4}
            assert [(m["type"], m["id"], m["display_name"], m["created_at"]) for m in body["data"]] == [
                ("model", SONNET, "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
                ("model", HAIKU, "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
                ("model", OPUS_4, "Claude Opus 4", "2025-05-14T00:00:00Z"),
            ]
            assert (await http.get("/v1/models", params={"limit": 0})).status_code == 400
            assert (await http.get("/v1/models")).status_code == 200
            assert (await http.get("/v1/models", headers={"x-api-key": "wrong"})).status_code == 401
        assert srv.chat_requests[0].json["model"] == "claude-haiku-4-5"


# ----------------------------------------------------------------------------- health


async def test_health_lists_the_served_models_with_their_aliases() -> None:
    with FakeAnthropic([SONNET, HAIKU], api_key=KEY, aliases={"claude-sonnet-4-5": SONNET}) as srv:
        provider = await provider_for(srv, anthropic_model="claude-sonnet-4-5")
        try:
            report = await provider.check_health(2.0)
        finally:
            await provider.aclose()
        assert report.ok and report.reachable and report.error == ""
        assert report.served_models == [SONNET, HAIKU, "claude-sonnet-4-5", "claude-haiku-4-5"]
        assert [r.path for r in srv.requests] == ["/v1/models"]  # one cheap request
        assert srv.requests[0].query == "limit=1000" and srv.chat_requests == []


async def test_health_resolves_a_configured_model_the_list_does_not_name() -> None:
    with FakeAnthropic([SONNET], api_key=KEY, aliases={"claude-sonnet": SONNET}) as srv:
        provider = await provider_for(srv, anthropic_model="claude-sonnet")
        try:
            report = await provider.check_health(2.0)
        finally:
            await provider.aclose()
        assert report.ok and report.served_models == [SONNET, "claude-sonnet-4-5", "claude-sonnet"]
        assert [r.path for r in srv.requests] == ["/v1/models", "/v1/models/claude-sonnet"]


async def test_health_reports_an_unserved_configured_model() -> None:
    with FakeAnthropic([SONNET], api_key=KEY) as srv:
        provider = await provider_for(srv, anthropic_model="claude-nope")
        try:
            report = await provider.check_health(2.0)
        finally:
            await provider.aclose()
        assert not report.ok and report.reachable
        assert "ANTHROPIC_MODEL='claude-nope'" in report.error and SONNET in report.error
        assert report.served_models == [SONNET, "claude-sonnet-4-5"]


@pytest.mark.parametrize(
    ("setup", "ok", "reachable", "error"),
    [
        ("wrong key", False, True, "check ANTHROPIC_API_KEY"),
        ("refused", False, False, "unreachable"),
        ("models 500", False, True, "anthropic answered 500"),
        ("models 529", False, True, "anthropic answered 529"),
        ("no models endpoint", True, True, ""),
    ],
)
async def test_health_failures_are_reported_honestly(setup: str, ok: bool, reachable: bool, error: str) -> None:
    with FakeAnthropic([SONNET], api_key="other-key" if setup == "wrong key" else KEY) as srv:
        provider = await provider_for(srv, anthropic_model=SONNET)
        if setup == "refused":
            srv.stop_listening()
        elif setup.startswith("models"):
            srv.models_status = int(setup.split()[1])
        elif setup == "no models endpoint":  # a proxy in ANTHROPIC_BASE_URL that only relays messages
            srv.models_status = 404
        try:
            report = await provider.check_health(2.0)
        finally:
            await provider.aclose()
        assert (report.ok, report.reachable) == (ok, reachable), report
        assert error in report.error and (report.error == "") is ok
        assert report.served_models == [] and srv.chat_requests == []
