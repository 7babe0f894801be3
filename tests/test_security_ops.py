"""Operating the guard: a rotated TLS certificate served without dropping open calls (and a broken
one refused), the container health check with a key and over a unix socket, and the audit log of
refusals and admin calls (never a token)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import grpc
import pytest
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

import clients
from service.healthcheck import check
from service.server import Gateway
from tests.conftest import make_settings, start_gateway, stop_gateway
from tests.fakes import CannedProvider, Pki, bearer, issue_pki

ALPHA = "alpha-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
KEYS = {"inference_api_keys": f"alpha:{ALPHA}", "admin_api_keys": f"ops:{ADMIN}"}
HELLO = [pb.Message(role=pb.ROLE_USER, content="hello")]


def two_pkis(tmp_path: Path) -> tuple[Pki, Pki]:
    """Two unrelated CAs, each with a server certificate for localhost/127.0.0.1."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    return issue_pki(tmp_path / "old"), issue_pki(tmp_path / "new")


def install_pki(source: Pki, cert: Path, key: Path) -> None:
    """Puts ``source``'s server certificate and key where the gateway reads them (a rotation)."""
    shutil.copyfile(source.server_cert, cert)
    shutil.copyfile(source.server_key, key)


async def test_a_rotated_certificate_is_served_without_dropping_open_calls(tmp_path: Path) -> None:
    old, new = two_pkis(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    await asyncio.to_thread(install_pki, old, cert, key)
    gate = asyncio.Event()
    provider = CannedProvider(gate=gate)
    provider.pause_before_delta = 1
    settings = make_settings(tls_cert_file=str(cert), tls_key_file=str(key), config_reload_interval_s=0.05, **KEYS)
    running = await start_gateway(settings, [provider])
    target = running.target
    try:
        async with clients.AsyncInferenceClient(target, api_key=ALPHA, root_certificates=old.ca) as before:
            async with before.chat_stream("hello", timeout_s=20) as stream:
                first = await anext(aiter(stream))  # a stream open on the old certificate
                assert first == "canned "
                await asyncio.to_thread(install_pki, new, cert, key)
                tls = running.gateway.security.tls
                assert tls is not None
                new_cert = await asyncio.to_thread(new.server_cert.read_bytes)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while tls.current.cert != new_cert:  # the watcher picks the files up within a few polls
                    assert loop.time() < deadline, "the new certificate was not loaded"
                    await asyncio.sleep(0.05)
                provider.gate = asyncio.Event()  # new calls pass; the open stream still waits on the old gate
                provider.gate.set()
                async with clients.AsyncInferenceClient(target, api_key=ALPHA, root_certificates=new.ca) as after:
                    assert (await after.chat("hello", timeout_s=5)).text == "canned answer"
                gate.set()
                rest = [text async for text in stream]
            assert first + "".join(rest) == "canned answer", "the call opened before the rotation finished"
        async with clients.AsyncInferenceClient(target, api_key=ALPHA, root_certificates=old.ca) as stale:
            with pytest.raises(clients.UnavailableError):
                await stale.chat("hello", timeout_s=2)  # new connections get the new certificate only
    finally:
        gate.set()
        await stop_gateway(running)


async def test_a_certificate_without_its_key_is_refused_and_the_old_pair_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = two_pkis(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    await asyncio.to_thread(install_pki, old, cert, key)
    settings = make_settings(tls_cert_file=str(cert), tls_key_file=str(key), config_reload_interval_s=0, **KEYS)
    running = await start_gateway(settings, [CannedProvider()])
    try:
        await asyncio.to_thread(shutil.copyfile, new.server_cert, cert)  # the certificate, not yet its key
        with caplog.at_level(logging.ERROR):
            result = running.gateway.reload("SIGHUP")
        assert "tls" in result.failed and "not a usable certificate and key" in result.failed["tls"]
        async with clients.AsyncInferenceClient(running.target, api_key=ALPHA, root_certificates=old.ca) as client:
            assert (await client.chat("hello", timeout_s=5)).text == "canned answer"
        await asyncio.to_thread(shutil.copyfile, new.server_key, key)  # the key arrives: the pair is whole
        assert running.gateway.reload("SIGHUP").changed == ["tls"]
        async with clients.AsyncInferenceClient(running.target, api_key=ALPHA, root_certificates=new.ca) as client:
            assert (await client.chat("hello", timeout_s=5)).text == "canned answer"
    finally:
        await stop_gateway(running)


async def test_health_check_sends_a_key_when_health_needs_one() -> None:
    running = await start_gateway(make_settings(auth_exempt_health=False, **KEYS), [CannedProvider()])
    try:
        env = {"GRPC_LISTEN_ADDRESS": f"0.0.0.0:{running.gateway.port}"}
        assert not await asyncio.to_thread(check, env, 2.0), "refused without a key"
        assert await asyncio.to_thread(check, env | {"HEALTHCHECK_API_KEY": ADMIN})
        assert not await asyncio.to_thread(check, env | {"HEALTHCHECK_API_KEY": "not-a-key-0123456789"}, 2.0)
    finally:
        await stop_gateway(running)


def test_startup_warns_when_the_health_check_has_no_key(caplog: pytest.LogCaptureFixture) -> None:
    from service.guard.security import Security

    with caplog.at_level(logging.WARNING, logger="service.guard.security"):
        Security(make_settings(auth_exempt_health=False, **KEYS)).check_bind()
    assert "HEALTHCHECK_API_KEY is unset" in caplog.text


async def test_a_unix_socket_bind_serves_and_passes_the_health_check(tmp_path: Path) -> None:
    socket = tmp_path / "gateway.sock"
    gateway = Gateway(make_settings(grpc_listen_address=f"unix:{socket}"), [CannedProvider()])
    await gateway.start()
    try:
        assert await asyncio.to_thread(check, {"GRPC_LISTEN_ADDRESS": f"unix:{socket}"})
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            reply = await pb_grpc.InferenceServiceStub(channel).Chat(pb.ChatRequest(messages=HELLO), timeout=5)
        assert reply.message.content == "canned answer"
    finally:
        await gateway.stop(grace_s=0.5)


async def test_refusals_and_admin_calls_are_audited_without_tokens(caplog: pytest.LogCaptureFixture) -> None:
    running = await start_gateway(make_settings(**KEYS), [CannedProvider()])
    caplog.set_level(logging.INFO, logger="service.audit")
    try:
        for metadata in ((), bearer(ALPHA + "x")):
            with pytest.raises(grpc.aio.AioRpcError):
                await running.stub.Chat(pb.ChatRequest(messages=HELLO), metadata=metadata, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.GetProviderStatus(pb.GetProviderStatusRequest(), metadata=bearer(ALPHA), timeout=5)
        await running.stub.GetProviderStatus(pb.GetProviderStatusRequest(), metadata=bearer(ADMIN), timeout=5)
    finally:
        await stop_gateway(running)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.audit"]
    summary = [(a["event"], a["outcome"], a.get("reason", ""), a["tenant"]) for a in lines]
    assert summary == [
        ("authentication", "refused", "missing", ""),
        ("authentication", "refused", "invalid", ""),
        ("permission", "refused", "wrong_role", ""),
        ("admin_call", "allowed", "", "ops"),
    ]
    assert all(a["peer"].startswith(("ipv4:", "ipv6:")) and a["time"] and a["method"] for a in lines)
    assert lines[-1]["method"] == "inference.v1.InferenceService/GetProviderStatus"
    assert ALPHA not in caplog.text and ADMIN not in caplog.text
