"""Authentication, the admin RPC, the bind guard and TLS/mTLS, against running in-process gateways."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from inference.v1 import inference_pb2 as pb

import clients
from service.config import Settings
from service.errors import ConfigError
from service.guard.security import Security, is_loopback
from service.server import Gateway
from tests.conftest import RunningGateway, make_settings, start_gateway, stop_gateway
from tests.fakes import CannedProvider, Pki, bearer, issue_pki

ALPHA = "alpha-token-0123456789abcdef"
ALPHA_2 = "alpha-rotated-0123456789abcdef"
BETA = "beta-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
KEYS = {"inference_api_keys": f"alpha:{ALPHA}, beta:{BETA},alpha:{ALPHA_2}", "admin_api_keys": f"ops:{ADMIN}"}
HELLO = [pb.Message(role=pb.ROLE_USER, content="hello")]


def error_reason(exc: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(exc)
    assert status is not None, "every gateway status carries google.rpc details"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


@pytest_asyncio.fixture(scope="module")
async def secured() -> AsyncIterator[RunningGateway]:
    """A gateway with two tenants (alpha holds two tokens) and one admin."""
    running = await start_gateway(make_settings(**KEYS), [CannedProvider()])
    yield running
    await stop_gateway(running)


# ----------------------------------------------------------------------------- tenant keys


@pytest.mark.parametrize("rpc", ["Chat", "ChatStream"])
@pytest.mark.parametrize(
    ("metadata", "kind"),
    [
        ((), "missing API key"),
        (bearer("not-a-configured-token-123456"), "not valid"),
        ((("authorization", f"Basic {ALPHA}"),), "malformed"),
        ((("authorization", ALPHA),), "malformed"),
        ((("authorization", "Bearer"),), "malformed"),
        ((("authorization", f"Bearer {ALPHA} extra"),), "malformed"),
        (bearer(ALPHA[:-1]), "not valid"),
        (bearer(ALPHA + "x"), "not valid"),
    ],
)
async def test_bad_credentials_are_unauthenticated_with_a_helpful_message(
    secured: RunningGateway, rpc: str, metadata: tuple[tuple[str, str], ...], kind: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if rpc == "Chat":
            await secured.stub.Chat(pb.ChatRequest(messages=HELLO), metadata=metadata, timeout=5)
        else:
            async for _ in secured.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO), metadata=metadata, timeout=5):
                pass
    exc = info.value
    assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
    details = exc.details() or ""
    assert kind in details
    assert "authorization: Bearer <token>" in details and "INFERENCE_API_KEYS" in details
    assert error_reason(exc) == "UNAUTHENTICATED"
    for word in " ".join(value for _, value in metadata).split():
        if word not in ("Bearer", "Basic"):
            assert word not in details, "the presented token must never be echoed"


async def test_valid_tenant_tokens_are_served_as_their_tenant(secured: RunningGateway) -> None:
    provider = secured.gateway.router.slots[0].provider
    assert isinstance(provider, CannedProvider)
    provider.tenants.clear()
    for token in (ALPHA, ALPHA_2, BETA):
        r = await secured.stub.Chat(pb.ChatRequest(messages=HELLO), metadata=bearer(token), timeout=5)
        assert r.message.content == "canned answer"
    lowercase = (("authorization", f"bearer {BETA}"),)
    messages = [
        m async for m in secured.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO), metadata=lowercase, timeout=5)
    ]
    assert messages[-1].final.usage.total_tokens == 8
    assert provider.tenants == ["alpha", "alpha", "beta", "beta"]


async def test_client_library_raises_authentication_error(secured: RunningGateway) -> None:
    async with clients.AsyncInferenceClient(secured.target, api_key="wrong-token-0123456789") as client:
        with pytest.raises(clients.AuthenticationError) as info:
            await client.chat("hello", timeout_s=5)
        assert info.value.reason == "UNAUTHENTICATED" and "wrong-token" not in str(info.value)
    async with clients.AsyncInferenceClient(secured.target, api_key=ALPHA) as client:
        assert (await client.chat("hello", timeout_s=5)).text == "canned answer"
        async with client.chat_stream("hello", timeout_s=5) as stream:
            assert "".join([t async for t in stream]) == "canned answer"


async def test_admin_key_may_not_chat(secured: RunningGateway) -> None:
    async with clients.AsyncInferenceClient(secured.target, api_key=ADMIN) as client:
        with pytest.raises(clients.PermissionDeniedError) as info:
            await client.chat("hello", timeout_s=5)
    assert "tenant token" in info.value.message and ADMIN not in info.value.message


# ----------------------------------------------------------------------------- health, reflection, admin


async def test_standard_health_and_reflection_stay_open(secured: RunningGateway) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    assert (
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    ).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(secured.channel)
    call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = [s.name async for r in call for s in r.list_services_response.service]
    assert "inference.v1.InferenceService" in names


async def test_inference_health_needs_any_key(secured: RunningGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await secured.stub.Health(pb.HealthRequest(), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    for token in (ALPHA, ADMIN):
        r = await secured.stub.Health(pb.HealthRequest(), metadata=bearer(token), timeout=5)
        assert r.status == pb.SERVING_STATUS_SERVING


async def test_admin_rpc_needs_an_admin_key(secured: RunningGateway) -> None:
    async with clients.AsyncInferenceClient(secured.target) as anonymous:
        with pytest.raises(clients.AuthenticationError) as unauth:
            await anonymous.provider_status()
    assert "ADMIN_API_KEYS" in unauth.value.message
    async with clients.AsyncInferenceClient(secured.target, api_key=ALPHA) as tenant:
        with pytest.raises(clients.PermissionDeniedError) as denied:
            await tenant.provider_status()
    assert denied.value.reason == "PERMISSION_DENIED" and "admin token" in denied.value.message
    async with clients.AsyncInferenceClient(secured.target, api_key=ADMIN) as admin:
        status = await admin.provider_status()
    assert [p.health.name for p in status.providers] == ["fake"] and status.max_concurrent_requests == 32


async def test_health_can_be_closed_too() -> None:
    running = await start_gateway(make_settings(**KEYS, auth_exempt_health=False), [CannedProvider()])
    try:
        health = health_pb2_grpc.HealthStub(running.channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        ok = await health.Check(health_pb2.HealthCheckRequest(), metadata=bearer(BETA), timeout=5)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel)
        call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [r async for r in call]
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await stop_gateway(running)


async def test_without_keys_everything_is_open_on_loopback() -> None:
    provider = CannedProvider()
    running = await start_gateway(make_settings(), [provider])
    try:
        async with clients.AsyncInferenceClient(running.target) as client:
            assert (await client.chat("hello", timeout_s=5)).text == "canned answer"
            assert len((await client.provider_status()).providers) == 1
        assert provider.tenants == ["anonymous"]
    finally:
        await stop_gateway(running)


# ----------------------------------------------------------------------------- key configuration


async def test_keys_from_a_file_with_comments(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# tenants of the staging gateway\n\ngamma:{'g' * 24}\n  delta : {'d' * 24}  \n# old: x\n")
    provider = CannedProvider()
    running = await start_gateway(
        make_settings(inference_api_keys=f"alpha:{ALPHA}", inference_api_keys_file=str(keys)), [provider]
    )
    try:
        for token in (ALPHA, "g" * 24, "d" * 24):
            await running.stub.Chat(pb.ChatRequest(messages=HELLO), metadata=bearer(token), timeout=5)
        assert provider.tenants == ["alpha", "gamma", "delta"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Chat(pb.ChatRequest(messages=HELLO), metadata=bearer("x"), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "g" * 24 in running.gateway.security.secrets()
    finally:
        await stop_gateway(running)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"inference_api_keys": "secret-without-a-tenant-123"}, "INFERENCE_API_KEYS entry 1 must be tenant:token"),
        ({"inference_api_keys": "a:ok-token-0123456789,b:"}, "INFERENCE_API_KEYS entry 2"),
        ({"inference_api_keys": "bad name:secret-value-123456"}, "the tenant must be"),
        ({"inference_api_keys": "a:secret value-123456"}, "printable ASCII without spaces"),
        ({"admin_api_keys": "secret-without-a-name-123"}, "ADMIN_API_KEYS entry 1 must be name:token"),
        (
            {"inference_api_keys": "a:secret-shared-123456", "admin_api_keys": "ops:secret-shared-123456"},
            "same token is configured for tenant 'a' and admin 'ops'",
        ),
        ({"inference_api_keys_file": "/nonexistent/keys.txt"}, "INFERENCE_API_KEYS_FILE=/nonexistent/keys.txt"),
        ({"rate_limit_rpm": -1}, "RATE_LIMIT_RPM=-1: Input should be greater than or equal to 0"),
    ],
)
def test_bad_key_configuration_is_a_clear_config_error(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        Security(make_settings(**overrides))
    message = str(info.value)
    assert expected in message
    assert "secret" not in message, "configuration errors must not quote tokens"


def test_key_file_line_numbers_in_errors(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nalpha:fine-token-0123456789\nsecret-token-without-tenant\n")
    with pytest.raises(ConfigError, match="line 3 must be tenant:token") as info:
        Security(make_settings(inference_api_keys_file=str(keys)))
    assert "secret" not in str(info.value)


# ----------------------------------------------------------------------------- the bind guard


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/tmp/gateway.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.5:50051", False),
        ("gateway.example.com:50051", False),
    ],
)
def test_loopback_detection(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


async def test_public_bind_without_keys_is_refused() -> None:
    gateway = Gateway(make_settings(grpc_listen_address="0.0.0.0:0"), [CannedProvider()])
    with pytest.raises(ConfigError, match="ALLOW_INSECURE_BIND") as info:
        await gateway.start()
    assert "INFERENCE_API_KEYS" in str(info.value)


@pytest.mark.parametrize("overrides", [{"allow_insecure_bind": True}, KEYS])
async def test_public_bind_allowed_with_keys_or_explicit_opt_in(overrides: dict[str, Any]) -> None:
    running = await start_gateway(make_settings(grpc_listen_address="0.0.0.0:0", **overrides), [CannedProvider()])
    try:
        health = health_pb2_grpc.HealthStub(running.channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == 1
    finally:
        await stop_gateway(running)


def test_auth_off_warns_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="service.guard.security"):
        Security(make_settings()).check_bind()
    assert "authentication is off" in caplog.text


# ----------------------------------------------------------------------------- TLS and mutual TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return issue_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Pki, **overrides: Any) -> Settings:
    return make_settings(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key), **overrides)


async def test_tls_serves_clients_that_trust_the_ca(pki: Pki) -> None:
    running = await start_gateway(tls_settings(pki, **KEYS), [CannedProvider()])
    try:
        async with clients.AsyncInferenceClient(running.target, api_key=ALPHA, root_certificates=pki.ca) as client:
            assert (await client.chat("hello", timeout_s=5)).text == "canned answer"
        target = f"localhost:{running.gateway.port}"
        async with clients.AsyncInferenceClient(
            target, api_key=BETA, root_certificates=pki.ca, server_name="localhost"
        ) as client:
            assert (await client.chat("hello", timeout_s=5)).text == "canned answer"

        def sync_call() -> str:
            with clients.InferenceClient(
                f"127.0.0.1:{running.gateway.port}", api_key=ALPHA, root_certificates=pki.ca, server_name="localhost"
            ) as sync_client:
                return sync_client.chat("hello", timeout_s=5).text

        assert await asyncio.to_thread(sync_call) == "canned answer"
        async with clients.AsyncInferenceClient(running.target, api_key=ALPHA) as plaintext:
            with pytest.raises(clients.UnavailableError):
                await plaintext.chat("hello", timeout_s=2)
        async with clients.AsyncInferenceClient(running.target, api_key=ALPHA, tls=True) as untrusting:
            with pytest.raises(clients.UnavailableError):
                await untrusting.chat("hello", timeout_s=2)
    finally:
        await stop_gateway(running)


async def test_mutual_tls_requires_a_client_certificate(pki: Pki) -> None:
    running = await start_gateway(tls_settings(pki, tls_client_ca_file=str(pki.ca_file)), [CannedProvider()])
    try:
        async with clients.AsyncInferenceClient(running.target, root_certificates=pki.ca) as no_cert:
            with pytest.raises(clients.UnavailableError):
                await no_cert.chat("hello", timeout_s=2)
        async with clients.AsyncInferenceClient(
            running.target, root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert
        ) as client:
            assert (await client.chat("hello", timeout_s=5)).text == "canned answer"
    finally:
        await stop_gateway(running)


async def test_mutual_tls_refuses_a_client_certificate_from_another_ca(pki: Pki, tmp_path: Path) -> None:
    stranger = issue_pki(tmp_path)  # a CA the gateway does not trust, and a client certificate it signed
    running = await start_gateway(tls_settings(pki, tls_client_ca_file=str(pki.ca_file)), [CannedProvider()])
    try:
        async with clients.AsyncInferenceClient(
            running.target,
            root_certificates=pki.ca,
            private_key=stranger.client_key,
            certificate_chain=stranger.client_cert,
        ) as foreign:
            with pytest.raises(clients.UnavailableError):
                await foreign.chat("hello", timeout_s=2)
    finally:
        await stop_gateway(running)


@pytest.mark.parametrize("which", ["tls_cert_file", "tls_key_file", "tls_client_ca_file"])
async def test_unreadable_tls_files_are_config_errors(pki: Pki, tmp_path: Path, which: str) -> None:
    settings = tls_settings(pki, tls_client_ca_file=str(pki.ca_file))
    missing = settings.replace(**{which: str(tmp_path / "missing.pem")})
    provider = CannedProvider()
    with pytest.raises(ConfigError, match=f"{which.upper()}=.*cannot be read"):
        await Gateway(missing, [provider]).start()
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="is not a PEM file"):
        await Gateway(settings.replace(**{which: str(not_pem)}), [provider]).start()


async def test_container_health_check_speaks_tls_and_mtls(pki: Pki) -> None:
    from service.healthcheck import check

    plain = await start_gateway(make_settings(), [CannedProvider()])
    tls = await start_gateway(tls_settings(pki), [CannedProvider()])
    mtls = await start_gateway(tls_settings(pki, tls_client_ca_file=str(pki.ca_file)), [CannedProvider()])
    client_cert, client_key = Path(str(pki.ca_file)).parent / "hc.pem", Path(str(pki.ca_file)).parent / "hc.key"
    client_cert.write_bytes(pki.client_cert)
    client_key.write_bytes(pki.client_key)
    try:
        tls_env = {"TLS_CERT_FILE": str(pki.server_cert), "HEALTHCHECK_CA_FILE": str(pki.ca_file)}
        assert await asyncio.to_thread(check, {"GRPC_LISTEN_ADDRESS": f"0.0.0.0:{plain.gateway.port}"})
        assert await asyncio.to_thread(check, {"GRPC_LISTEN_ADDRESS": f"0.0.0.0:{tls.gateway.port}", **tls_env})
        # Plaintext against TLS, and TLS without a client certificate against mTLS, both fail.
        assert not await asyncio.to_thread(check, {"GRPC_LISTEN_ADDRESS": f"127.0.0.1:{tls.gateway.port}"}, 2.0)
        mtls_env = {"GRPC_LISTEN_ADDRESS": f"127.0.0.1:{mtls.gateway.port}", **tls_env}
        assert not await asyncio.to_thread(check, mtls_env, 2.0)
        mtls_env |= {"HEALTHCHECK_CLIENT_CERT_FILE": str(client_cert), "HEALTHCHECK_CLIENT_KEY_FILE": str(client_key)}
        assert await asyncio.to_thread(check, mtls_env)
    finally:
        for running in (plain, tls, mtls):
            await stop_gateway(running)
