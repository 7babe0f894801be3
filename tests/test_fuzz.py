"""Property tests: whatever a caller sends, the gateway answers with a deliberate status.

Generated requests (unicode, NUL and huge strings, out-of-range enum ints, NaN and infinities,
extreme ints, empty and oversized repeated fields, and raw bytes that are not a valid message at
all) go to a running gateway over a real channel, on Chat and ChatStream. Never INTERNAL or
UNKNOWN: a caller's mistake is INVALID_ARGUMENT (or RESOURCE_EXHAUSTED from gRPC itself for an
oversize message, and only then), and the server stays SERVING. Requests that are valid by
construction succeed. Random model names (as many as the profile's examples: 10,000 in the long
run) add no metric series.

Examples per test come from the hypothesis profile ``GATEWAY_FUZZ_PROFILE`` (``ci``: 250, the
default; ``fuzz``: 10,000, used by ``scripts/fuzz.py``); ``GATEWAY_FUZZ_EXAMPLES`` overrides.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inference.v1 import inference_pb2 as pb
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.conftest import RunningGateway, make_settings, start_gateway, stop_gateway
from tests.fakes import CannedProvider, bearer
from tests.otel_memory import install_metrics, series, snapshot

_COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=250, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("fuzz", max_examples=10_000, **_COMMON)  # type: ignore[arg-type]
PROFILE = settings.get_profile(os.environ.get("GATEWAY_FUZZ_PROFILE", "ci"))
if os.environ.get("GATEWAY_FUZZ_EXAMPLES"):
    PROFILE = settings(PROFILE, max_examples=int(os.environ["GATEWAY_FUZZ_EXAMPLES"]))

MAX_REQUEST_BYTES = 256 * 1024  # smaller than the default, so oversize requests stay cheap to generate
MAX_CONTENT_CHARS = 20_000
MAX_TOKENS_CAP = 4096
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


@pytest_asyncio.fixture(scope="module")
async def fuzz_gateway() -> AsyncIterator[RunningGateway]:
    """A gateway on a canned provider, with limits small enough for generated data to cross."""
    settings_ = make_settings(
        max_request_bytes=MAX_REQUEST_BYTES, max_content_chars=MAX_CONTENT_CHARS, max_messages=64, max_tokens_cap=4096
    )
    running = await start_gateway(settings_, [CannedProvider()])
    yield running
    await stop_gateway(running)


def huge(n_max: int) -> st.SearchStrategy[str]:
    return st.builds(lambda n, c: c * n, st.integers(0, n_max), st.sampled_from(["x", "é", "\x00", "🦀", " "]))


TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\n\t", "\u202e", "\ufeff", "ROLE_USER", "Qwen/Qwen2.5-7B"]),
    huge(MAX_CONTENT_CHARS * 2),
)
ROLE = st.one_of(st.sampled_from([0, 1, 2, 3]), INT32)
FLOAT = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 2.0]))
MESSAGES = st.one_of(
    st.lists(st.builds(pb.Message, role=ROLE, content=TEXT), max_size=8),
    st.integers(60, 70).map(lambda n: [pb.Message(role=pb.ROLE_USER, content="hi")] * n),  # around MAX_MESSAGES
    huge(MAX_REQUEST_BYTES * 2).map(lambda s: [pb.Message(role=pb.ROLE_USER, content=s)]),
)


@st.composite
def any_request(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {"messages": draw(MESSAGES), "model": draw(TEXT), "stop": draw(st.lists(TEXT, max_size=6))}
    fields["cold_start_policy"] = draw(st.one_of(st.sampled_from([0, 1, 2]), INT32))
    for name, strategy in (
        ("temperature", FLOAT),
        ("top_p", FLOAT),
        ("max_tokens", st.one_of(st.none(), INT32, st.sampled_from([0, 1, MAX_TOKENS_CAP, MAX_TOKENS_CAP + 1]))),
        ("seed", st.one_of(st.none(), INT64)),
    ):
        value = draw(strategy)
        if value is not None:
            fields[name] = value
    return fields


ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
PRINTABLE = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x2FFF, exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp"]),
    min_size=1,
)


@st.composite
def valid_request(draw: st.DrawFn) -> dict[str, Any]:
    system = draw(st.lists(PRINTABLE.map(lambda t: pb.Message(role=pb.ROLE_SYSTEM, content=t)), max_size=1))
    turns = draw(
        st.lists(st.builds(pb.Message, role=st.sampled_from([2, 3]), content=PRINTABLE), min_size=1, max_size=6)
    )
    fields: dict[str, Any] = {"messages": system + turns}
    if draw(st.booleans()):
        fields["model"] = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,60}", fullmatch=True))
    optional = {
        "temperature": st.floats(0.0, 2.0, width=32),
        "top_p": st.floats(0.0, 1.0, width=32, exclude_min=True),
        "max_tokens": st.integers(1, MAX_TOKENS_CAP),
        "seed": st.integers(0, 2**32 - 1),
        "stop": st.lists(
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=8), max_size=4
        ),
        "cold_start_policy": st.sampled_from([0, 1, 2]),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            fields[name] = draw(strategy)
    return fields


async def call(running: RunningGateway, rpc: str, fields: dict[str, Any]) -> tuple[grpc.StatusCode, Any]:
    """Sends the request; returns (code, the answer's text or the error)."""
    try:
        if rpc == "Chat":
            response = await running.stub.Chat(pb.ChatRequest(**fields), timeout=10)
            return grpc.StatusCode.OK, response.message.content
        messages = [m async for m in running.stub.ChatStream(pb.ChatStreamRequest(**fields), timeout=10)]
        assert messages and messages[-1].HasField("final"), "a successful stream ends with its final message"
        return grpc.StatusCode.OK, "".join(m.delta.text for m in messages[:-1])
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc


def check_error(code: grpc.StatusCode, exc: grpc.aio.AioRpcError, size: int) -> None:
    """A deliberate refusal of a request of ``size`` bytes: INVALID_ARGUMENT with details, or
    RESOURCE_EXHAUSTED from gRPC itself, and only for a message over MAX_REQUEST_BYTES (this
    gateway has no rate limits and calls run one at a time, so nothing else may exhaust)."""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert size > MAX_REQUEST_BYTES, f"RESOURCE_EXHAUSTED for a {size}-byte request: {exc.details()}"
        return
    assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {exc.details()}"
    status = rpc_status.from_call(exc)
    assert status is not None and status.details, "INVALID_ARGUMENT carries google.rpc details"
    assert status.details[0].Is(error_details_pb2.ErrorInfo.DESCRIPTOR)


async def assert_serving(running: RunningGateway) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert running.gateway.in_flight() == 0


@settings(PROFILE)
@given(fields=any_request(), rpc=st.sampled_from(["Chat", "ChatStream"]))
async def test_generated_requests_never_fail_internally(
    fuzz_gateway: RunningGateway, fields: dict[str, Any], rpc: str
) -> None:
    code, result = await call(fuzz_gateway, rpc, fields)
    if code is grpc.StatusCode.OK:
        assert result == "canned answer"
    else:
        check_error(code, result, pb.ChatRequest(**fields).ByteSize())


@settings(PROFILE)
@given(blob=st.one_of(st.binary(max_size=300), st.builds(lambda b: b"\x0a\x04\x12\x02" + b, st.binary(max_size=8))))
async def test_raw_bytes_never_fail_internally(fuzz_gateway: RunningGateway, blob: bytes) -> None:
    for method in ("Chat", "ChatStream"):
        path = f"/inference.v1.InferenceService/{method}"
        try:
            if method == "Chat":
                await fuzz_gateway.channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)(
                    blob, timeout=10
                )
            else:
                stream = fuzz_gateway.channel.unary_stream(path, request_serializer=bytes, response_deserializer=bytes)
                _ = [m async for m in stream(blob, timeout=10)]
        except grpc.aio.AioRpcError as exc:
            check_error(exc.code(), exc, len(blob))


@settings(PROFILE)
@given(fields=valid_request(), rpc=st.sampled_from(["Chat", "ChatStream"]))
async def test_valid_requests_succeed(fuzz_gateway: RunningGateway, fields: dict[str, Any], rpc: str) -> None:
    code, result = await call(fuzz_gateway, rpc, fields)
    assert code is grpc.StatusCode.OK, f"{code.name}: {getattr(result, 'details', lambda: result)()}"
    assert result == "canned answer"


async def test_oversize_message_is_refused_and_the_server_stays_healthy(fuzz_gateway: RunningGateway) -> None:
    fields = {"messages": [pb.Message(role=pb.ROLE_USER, content="x" * (MAX_REQUEST_BYTES + 10))]}
    for rpc in ("Chat", "ChatStream"):
        code, _ = await call(fuzz_gateway, rpc, fields)
        assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT), code
    await assert_serving(fuzz_gateway)


async def test_still_serving_after_fuzzing(fuzz_gateway: RunningGateway) -> None:
    await assert_serving(fuzz_gateway)
    code, text = await call(fuzz_gateway, "Chat", {"messages": [pb.Message(role=pb.ROLE_USER, content="hi")]})
    assert code is grpc.StatusCode.OK and text == "canned answer"


async def test_a_request_wrong_everywhere_gets_a_bounded_invalid_argument(fuzz_gateway: RunningGateway) -> None:
    """Hundreds of violations would overflow the client's 8 KiB trailing-metadata limit (the caller
    would see a misleading RESOURCE_EXHAUSTED); the list is capped and says how many were left out."""
    fields = {
        "messages": [pb.Message(role=99, content="")] * 64,
        "temperature": float("nan"),
        "top_p": 0.0,
        "max_tokens": -1,
        "model": "no spaces allowed",
        "stop": ["", "\x00"],
        "seed": -1,
        "cold_start_policy": 7,
    }
    for rpc in ("Chat", "ChatStream"):
        code, exc = await call(fuzz_gateway, rpc, fields)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, exc
        status = rpc_status.from_call(exc)
        assert status is not None
        bad = error_details_pb2.BadRequest()
        assert status.details[1].Unpack(bad)
        fields_named = [v.field for v in bad.field_violations]
        assert len(fields_named) == 20 and "more violations are not listed" in bad.field_violations[-1].description
        scalars = {"temperature", "top_p", "max_tokens", "model", "stop[0]", "stop[1]", "seed", "cold_start_policy"}
        assert scalars <= set(fields_named), "per-field violations are never the ones cut off"


# ----------------------------------------------------------------------------- label cardinality

TENANT_TOKEN = "alpha-token-0123456789abcdef"
HI = [pb.Message(role=pb.ROLE_USER, content="hi")]
MODEL_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,80}", fullmatch=True)


async def tenant_call(running: RunningGateway, rpc: str, model: str) -> None:
    if rpc == "Chat":
        await running.stub.Chat(pb.ChatRequest(messages=HI, model=model), metadata=bearer(TENANT_TOKEN))
    else:
        stream = running.stub.ChatStream(pb.ChatStreamRequest(messages=HI, model=model), metadata=bearer(TENANT_TOKEN))
        _ = [m async for m in stream]


@pytest_asyncio.fixture(scope="module")
async def metered_gateway() -> AsyncIterator[tuple[RunningGateway, InMemoryMetricReader]]:
    """A gateway with one tenant, recording metrics in memory, every series already made once."""
    reader = install_metrics()
    if reader is None:
        pytest.skip("another test installed a MeterProvider first")
    running = await start_gateway(make_settings(inference_api_keys=f"alpha:{TENANT_TOKEN}"), [CannedProvider()])
    for model in ("canned-model", "not-configured"):
        for rpc in ("Chat", "ChatStream"):
            await tenant_call(running, rpc, model)
    yield running, reader
    await stop_gateway(running)


@settings(PROFILE)
@given(model=MODEL_NAMES, rpc=st.sampled_from(["Chat", "ChatStream"]))
async def test_random_model_names_create_no_new_series(
    metered_gateway: tuple[RunningGateway, InMemoryMetricReader], model: str, rpc: str
) -> None:
    """A caller cannot grow the metrics: a model name that is not configured is labelled ``other``."""
    running, reader = metered_gateway
    points = snapshot(reader)
    before = set(points)
    await tenant_call(running, rpc, model)
    after = snapshot(reader)
    assert set(after) <= before, f"model {model!r} made new series: {set(after) - before}"
    # The series this call moved (the reader is shared by the whole test process, so earlier tests'
    # configured models may be there too).
    moved = {k: v for k, v in after.items() if points.get(k) != v}
    models = {a.get("gen_ai.request.model") for a in series(moved, "gen_ai.client.operation.duration")}
    assert models and models <= {"canned-model", "other"}
    assert {a.get("gateway.tenant") for a in series(moved, "gateway.rpc.calls")} <= {"alpha", "anonymous"}
