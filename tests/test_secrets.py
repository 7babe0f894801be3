"""No secret ever leaves the gateway: not in logs, traces, error messages or details, Health or
GetProviderStatus output.

The real service process (``python -m service``, LOG_LEVEL=DEBUG, console trace exporter) runs
with every secret configured to a distinctive value and a chain of real fake upstreams: Modal
(its proxy auth refuses the gateway), Anthropic (refuses the key), the legacy vLLM host (serves,
then fails). Calls succeed, fail over, fail everywhere, and fail authentication; everything the
callers saw and everything the process printed is searched for every secret.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

import clients
from service.config import Settings
from tests.conftest import make_settings, start_gateway, stop_gateway
from tests.upstreams import FakeAnthropic, FakeOpenAI, Status

ROOT = Path(__file__).resolve().parent.parent
TENANT = "tenant-SECRET-0001-alpha"
FILE_TENANT = "tenant-SECRET-0002-from-file"
ADMIN = "admin-SECRET-0003-ops"
SECRET_ENV = {
    "INFERENCE_API_KEYS": f"alpha:{TENANT}",
    "ADMIN_API_KEYS": f"ops:{ADMIN}",
    "MODAL_TOKEN_ID": "ak-SECRET-0004-modal-token-id",
    "MODAL_TOKEN_SECRET": "as-SECRET-0005-modal-token-secret",
    "MODAL_PROXY_TOKEN_ID": "wk-SECRET-0006-proxy-id",
    "MODAL_PROXY_TOKEN_SECRET": "ws-SECRET-0007-proxy-secret",
    "MODAL_VLLM_API_KEY": "vllm-SECRET-0008-api-key",
    "VASTAI_API_KEY": "vast-SECRET-0009-api-key",
    "ANTHROPIC_API_KEY": "sk-ant-SECRET-0010-anthropic",
}
ALL_SECRETS = [TENANT, FILE_TENANT, ADMIN, *(v for k, v in SECRET_ENV.items() if not k.endswith("API_KEYS"))]
HELLO = [pb.Message(role=pb.ROLE_USER, content="hello")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fragments(secret: str) -> list[str]:
    """The secret and its halves: a truncated or partly masked echo is still a leak."""
    half = len(secret) // 2
    return [secret, secret[:half], secret[half:]]


def assert_clean(where: str, text: str) -> None:
    for secret in ALL_SECRETS:
        for piece in fragments(secret):
            assert piece not in text, f"a secret ({piece[:6]}...) appears in {where}"


def describe_error(exc: grpc.aio.AioRpcError) -> str:
    trailers = exc.trailing_metadata() or ()
    values = [v.decode("latin-1") if isinstance(v, bytes) else str(v) for _, v in trailers]
    return "\n".join([str(exc.code()), exc.details() or "", exc.debug_error_string() or "", *values])


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Any]]:
    """Modal whose proxy auth wants other credentials, Anthropic wanting another key, a working vLLM host."""
    modal = FakeOpenAI(required_headers={"Modal-Key": "someone-else", "Modal-Secret": "someone-else"})
    anthropic = FakeAnthropic(api_key="sk-ant-a-different-key")
    vast = FakeOpenAI(api_key=SECRET_ENV["VASTAI_API_KEY"])
    with modal, anthropic, vast:
        yield {"modal": modal, "anthropic": anthropic, "vast": vast}


@pytest.fixture(scope="module")
def service(upstreams: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The service process; yields its target, and its output once the test is done with it."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# tenants\nbeta:{FILE_TENANT}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "VASTAI_", "ANTHROPIC_", "OTEL_"))}
    env.update(SECRET_ENV)
    env.update(
        {
            "INFERENCE_API_KEYS_FILE": str(keys),
            "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "PROVIDER_ORDER": "modal,anthropic,vastai",
            "MODAL_WEB_URL": upstreams["modal"].base_url,
            # The Modal API token is live (container counts): keep the SDK on a closed loopback port,
            # and probe the stand-in at startup so the proxy token is really sent.
            "MODAL_SERVER_URL": f"http://127.0.0.1:{free_port()}",
            "MODAL_VALIDATE_ON_START": "probe",
            "ANTHROPIC_BASE_URL": upstreams["anthropic"].base_url,
            "VASTAI_VLLM_URL": upstreams["vast"].base_url,
            "LOG_LEVEL": "DEBUG",
            "OTEL_TRACES_EXPORTER": "console",
            "RETRY_INITIAL_DELAY_S": "0.01",
            "RETRY_MAX_DELAY_S": "0.02",
            "SHUTDOWN_GRACE_S": "2",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    state: dict[str, Any] = {"target": f"127.0.0.1:{port}", "env": env, "proc": proc}
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(state["target"]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert proc.poll() is None, (proc.stdout.read() if proc.stdout else b"").decode()
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the service did not start"
                    time.sleep(0.2)
        yield state
    finally:
        stop(state)


def stop(state: dict[str, Any]) -> str:
    """SIGTERM (the normal shutdown, which flushes traces), then everything the process printed."""
    if "output" not in state:
        proc = state["proc"]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        state["output"] = out.decode("utf-8", "replace")
    return str(state["output"])


def test_settings_list_every_secret(service: dict[str, Any]) -> None:
    listed = set(Settings.from_env(service["env"]).secrets())
    assert listed >= set(ALL_SECRETS) - {FILE_TENANT}, "Settings.secrets() misses a configured secret"


async def test_no_secret_in_any_answer_or_error(service: dict[str, Any], upstreams: dict[str, Any]) -> None:
    seen: list[str] = []
    target = service["target"]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def attempt(name: str, call: Any) -> Any:
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                seen.append(f"{name}: {describe_error(exc)}")
                return exc
            seen.append(f"{name}: {response}")
            return response

        auth = (("authorization", f"Bearer {TENANT}"),)
        served = await attempt("chat", stub.Chat(pb.ChatRequest(messages=HELLO), metadata=auth, timeout=20))
        assert isinstance(served, pb.ChatResponse) and served.provider == "vastai", served
        assert [a.provider for a in served.attempts][-1] == "vastai"
        file_auth = (("authorization", f"Bearer {FILE_TENANT}"),)
        stream = stub.ChatStream(pb.ChatStreamRequest(messages=HELLO), metadata=file_auth, timeout=20)
        seen.extend(str(m) for m in [m async for m in stream])
        for name, metadata in {
            "wrong key (the real one plus a character)": (("authorization", f"Bearer {TENANT}x"),),
            "key prefix": (("authorization", f"Bearer {TENANT[:-1]}"),),
            "admin key on chat": (("authorization", f"Bearer {ADMIN}"),),
            "malformed": (("authorization", TENANT),),
        }.items():
            failed = await attempt(name, stub.Chat(pb.ChatRequest(messages=HELLO), metadata=metadata, timeout=10))
            assert isinstance(failed, grpc.aio.AioRpcError)
        await attempt("health", stub.Health(pb.HealthRequest(), metadata=auth, timeout=10))
        admin = (("authorization", f"Bearer {ADMIN}"),)
        status = await attempt("admin", stub.GetProviderStatus(pb.GetProviderStatusRequest(), metadata=admin))
        assert isinstance(status, pb.GetProviderStatusResponse)
        assert {p.health.name for p in status.providers} == {"modal", "anthropic", "vastai"}
        assert any(p.health.last_error for p in status.providers), "failures are reported, just not secrets"
        await attempt("admin as tenant", stub.GetProviderStatus(pb.GetProviderStatusRequest(), metadata=auth))
        await attempt("invalid", stub.Chat(pb.ChatRequest(messages=HELLO, top_p=7), metadata=auth, timeout=10))
        # The secrets were really in use: the upstreams received them.
        vast_auth = {r.headers.get("authorization") for r in upstreams["vast"].requests}
        assert f"Bearer {SECRET_ENV['VASTAI_API_KEY']}" in vast_auth
        modal_keys = {r.headers.get("modal-key") for r in upstreams["modal"].requests}
        assert SECRET_ENV["MODAL_PROXY_TOKEN_ID"] in modal_keys
        # Every provider fails: the error lists each one's failure.
        upstreams["vast"].enqueue(*[Status(503)] * 20)
        failed = await attempt("all fail", stub.Chat(pb.ChatRequest(messages=HELLO), metadata=auth, timeout=20))
        assert isinstance(failed, grpc.aio.AioRpcError) and failed.code() is grpc.StatusCode.UNAVAILABLE
        assert "vastai" in (failed.details() or "")
    async with clients.AsyncInferenceClient(target, api_key=f"{TENANT}!") as client:
        with pytest.raises(clients.AuthenticationError) as info:
            await client.chat("hello", timeout_s=10)
        seen.append(f"{info.value} {info.value.metadata}")
    assert_clean("answers and errors", "\n".join(seen))


def test_no_secret_in_logs_or_traces(service: dict[str, Any]) -> None:
    """Runs last: it stops the process to read all of its output."""
    output = stop(service)
    assert "authentication on" in output and "DEBUG" in output, "the log is the one we think it is"
    assert "gen_ai.operation.name" in output, "spans were exported to the console"
    assert_clean("the service's logs and traces", output)
    # The redaction hook is a second line of defence; here nothing even tried to log a secret.
    assert "[REDACTED]" not in output


# ----------------------------------------------------------------------------- an upstream that echoes a key

ECHOED_KEY = "vast-SECRET-0011-echoed-by-upstream"


async def echo_call(vast: FakeOpenAI) -> grpc.aio.AioRpcError:
    settings = make_settings(
        vastai_vllm_url=vast.base_url, vastai_api_key=ECHOED_KEY, provider_order=("vastai",), retry_max_retries=0
    )
    running = await start_gateway(settings)
    try:
        body = {"error": {"message": f"the key {ECHOED_KEY} may not use this model", "type": "BadRequestError"}}
        vast.enqueue(Status(400, body=body))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Chat(pb.ChatRequest(messages=HELLO), timeout=10)
        return info.value
    finally:
        await stop_gateway(running)


async def test_an_echoed_credential_is_redacted_from_logs(caplog: pytest.LogCaptureFixture) -> None:
    with FakeOpenAI(api_key=ECHOED_KEY) as vast, caplog.at_level(logging.DEBUG):
        error = await echo_call(vast)
        # Whatever logs the upstream's text, as an argument or inside a traceback, logs it redacted.
        log = logging.getLogger("service.routing.router")
        log.warning("provider failed: %s", error.details())
        try:
            raise RuntimeError(f"upstream said: bad key {ECHOED_KEY}")
        except RuntimeError:
            log.exception("while calling vastai")
    assert ECHOED_KEY not in caplog.text
    assert "[REDACTED]" in caplog.text
    assert all(ECHOED_KEY not in (r.exc_text or "") for r in caplog.records)


async def test_an_echoed_credential_is_redacted_from_errors() -> None:
    with FakeOpenAI(api_key=ECHOED_KEY) as vast:
        error = await echo_call(vast)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert ECHOED_KEY not in describe_error(error)


# ----------------------------------------------------------------------------- short keys, URLs, OTLP headers


def test_a_short_key_is_redacted_too(caplog: pytest.LogCaptureFixture) -> None:
    """Keys under 8 characters used to be left in the clear (they are warned about, and still keys)."""
    from service.guard.security import Security

    Security(make_settings(inference_api_keys="tiny:k3y42", admin_api_keys="ops:adm9"))
    with caplog.at_level(logging.INFO):
        logging.getLogger("service.test").info("a caller sent k3y42, another adm9")
    assert "k3y42" not in caplog.text and "adm9" not in caplog.text
    assert caplog.text.count("[REDACTED]") == 2


async def test_credentials_in_an_upstream_url_never_reach_logs_or_spans(caplog: pytest.LogCaptureFixture) -> None:
    from service.guard.redaction import redact

    assert redact("GET https://bob:hunter2@host.example/v1 failed") == "GET https://host.example/v1 failed"
    with FakeOpenAI() as vast:
        url = vast.base_url.replace("http://", "http://bob:hunter2-in-url@")
        settings = make_settings(vastai_vllm_url=url, provider_order=("vastai",))
        with caplog.at_level(logging.DEBUG):
            running = await start_gateway(settings)
            try:
                await running.stub.Chat(pb.ChatRequest(messages=HELLO), timeout=10)
                logging.getLogger("service.test").warning("the password alone: hunter2-in-url")
            finally:
                await stop_gateway(running)
    assert "hunter2-in-url" not in caplog.text and "bob:" not in caplog.text
    assert vast.base_url in caplog.text, "the URL itself is still logged, without its userinfo"


def test_otlp_header_values_are_secrets(caplog: pytest.LogCaptureFixture) -> None:
    from service.observe.otel_setup import setup_telemetry

    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20otlp-SECRET-0012,x-tenant=tn-SECRET-0013",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "api-key=tr-SECRET-0014",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
    }
    setup_telemetry(make_settings(), env)
    with caplog.at_level(logging.INFO):
        logging.getLogger("service.test").info("exporter said: otlp-SECRET-0012 tn-SECRET-0013 tr-SECRET-0014")
    for secret in ("otlp-SECRET-0012", "tn-SECRET-0013", "tr-SECRET-0014"):
        assert secret not in caplog.text


async def test_health_never_shows_credentials_in_an_endpoint() -> None:
    from tests.fakes import CannedProvider

    provider = CannedProvider("vastai")
    provider.endpoint = "https://gw-user:s3cret-pass@vllm.example.internal:8443"  # type: ignore[misc]
    running = await start_gateway(make_settings(), [provider])
    try:
        for message in (
            (await running.stub.Health(pb.HealthRequest())).providers[0],
            (await running.stub.GetProviderStatus(pb.GetProviderStatusRequest())).providers[0].health,
        ):
            assert message.endpoint == "https://vllm.example.internal:8443"
            assert "s3cret" not in str(message)
    finally:
        await stop_gateway(running)
