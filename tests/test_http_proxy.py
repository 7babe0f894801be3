"""Proxies as httpx treats them, over a real forward proxy on loopback: absolute-form requests for
http, a CONNECT tunnel with TLS inside for https, credentials from the proxy URL, NO_PROXY; and the
rule itself, table-tested against httpx's own choice (the Modal probe uses httpx)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.errors import ConfigError
from service.providers.http import client as http
from service.providers.http.proxies import parse_proxy, proxy_url_for
from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider
from tests.forward_proxy import ForwardProxy
from tests.rawserver import RawServer, ok

_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUEST_METHOD")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A clean proxy environment (both spellings), restored afterwards."""
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    yield monkeypatch


async def test_plain_http_goes_through_the_proxy_in_absolute_form(env: pytest.MonkeyPatch) -> None:
    async with ForwardProxy() as proxy, RawServer() as server:
        env.setenv("HTTP_PROXY", proxy.url)
        pool = http.Pool(server.url + "/base")
        assert pool.proxy is not None and pool.proxy.url == proxy.url
        for _ in range(2):
            assert await (await pool.request("GET", "/v1/models")).read() == b"second"
        await pool.aclose()
    assert [(p.method, p.target) for p in proxy.passed] == [("GET", f"{server.url}/base/v1/models")] * 2
    assert proxy.passed[0].headers["host"] == f"127.0.0.1:{server.port}"
    assert server.connections == 1  # kept alive through the proxy


async def test_proxy_credentials_come_from_the_proxy_url(env: pytest.MonkeyPatch) -> None:
    async with ForwardProxy(credentials="user:p@ss") as proxy, RawServer() as server:
        env.setenv("http_proxy", proxy.url.replace("//", "//user:p%40ss@"))
        pool = http.Pool(server.url)
        assert await (await pool.request("GET", "/")).read() == b"second"
        await pool.aclose()
        env.setenv("http_proxy", proxy.url.replace("//", "//user:wrong@"))
        refused = http.Pool(server.url)
        assert (await refused.request("GET", "/")).status == 407  # the proxy's answer, as httpx returns it
        await refused.aclose()
    assert proxy.passed[0].headers["proxy-authorization"] == "Basic dXNlcjpwQHNz"
    assert b"proxy-authorization" not in server.requests[0].lower()  # the proxy kept it


async def test_no_proxy_bypasses_the_proxy(env: pytest.MonkeyPatch) -> None:
    async with ForwardProxy() as proxy, RawServer() as server:
        env.setenv("HTTP_PROXY", proxy.url)
        for no_proxy in ("127.0.0.1", "*", "example.com,127.0.0.1"):
            env.setenv("NO_PROXY", no_proxy)
            pool = http.Pool(server.url)
            assert pool.proxy is None
            assert await (await pool.request("GET", "/")).read() == b"second"
            await pool.aclose()
    assert proxy.passed == []


@pytest.fixture
def tls_upstream(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting the test CA)."""
    from tests.fakes import issue_pki

    pki = issue_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    return server_ctx, ssl.create_default_context(cafile=str(pki.ca_file))


async def test_https_goes_through_a_connect_tunnel_with_tls_inside(
    env: pytest.MonkeyPatch, tls_upstream: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls_upstream
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await reader.readuntil(b"\r\n\r\n"))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(ok(b"secure"))
            await writer.drain()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ForwardProxy(credentials="u:p") as proxy:
            env.setenv("HTTPS_PROXY", proxy.url.replace("//", "//u:p@"))
            pool = http.Pool(f"https://localhost:{port}", ssl_context=client_ctx, headers={"x-secret": "s3cr3t"})
            for _ in range(2):
                assert await (await pool.request("POST", "/v1/chat/completions", b"{}")).read() == b"secure"
            await pool.aclose()
            wrong = http.Pool(f"https://localhost:{port}", ssl_context=client_ctx, proxy=proxy.url)
            with pytest.raises(http.ConnectFailed, match="407"):
                await wrong.request("GET", "/")
            await wrong.aclose()
    finally:
        server.close()
    tunnel = proxy.passed[0]
    assert (tunnel.method, tunnel.target) == ("CONNECT", f"localhost:{port}")
    assert tunnel.headers["proxy-authorization"] == "Basic dTpw"
    assert len(proxy.passed) == 2  # the tunnel was reused; the second entry is the refused one
    assert tunnel.tunnelled and b"s3cr3t" not in tunnel.tunnelled and b"POST" not in tunnel.tunnelled
    assert len(seen) == 2 and b"x-secret: s3cr3t" in seen[0] and b"proxy-authorization" not in seen[0].lower()


async def test_an_unreachable_proxy_is_a_connect_failure_naming_it(env: pytest.MonkeyPatch) -> None:
    env.setenv("ALL_PROXY", "http://127.0.0.1:9")
    pool = http.Pool("http://10.0.0.1:8000", connect_timeout_s=1)
    with pytest.raises(http.ConnectFailed, match=r"via proxy http://127\.0\.0\.1:9"):
        await pool.request("GET", "/")
    await pool.aclose()


async def test_a_proxy_url_the_client_cannot_use_stops_the_provider_with_a_message(env: pytest.MonkeyPatch) -> None:
    env.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    provider = OpenAICompatProvider(OpenAICompatConfig(name="vastai", base_url="http://10.0.0.1:8000", model="m"))
    with pytest.raises(ConfigError, match="SOCKS proxies are not supported"):
        await provider.start()


async def test_the_modal_probe_and_the_pool_take_the_same_route(env: pytest.MonkeyPatch) -> None:
    from modal_vllm.status import probe_endpoint

    async with ForwardProxy() as proxy, RawServer() as server:
        env.setenv("HTTP_PROXY", proxy.url)
        pool = http.Pool(server.url)
        await (await pool.request("GET", "/health")).read()
        await pool.aclose()
        await probe_endpoint(server.url, "")
        assert [p.target for p in proxy.passed][:2] == [f"{server.url}/health"] * 2
        env.setenv("NO_PROXY", "127.0.0.1")
        before = len(proxy.passed)
        await probe_endpoint(server.url, "")
        assert http.Pool(server.url).proxy is None and len(proxy.passed) == before


# ---- the rule, against httpx's own choice --------------------------------------------------

P = "http://proxy.test:3128"
RULE_CASES = [
    ({}, "http://vllm.test:8000"),
    ({"HTTP_PROXY": P}, "http://vllm.test:8000"),
    ({"HTTP_PROXY": P}, "https://vllm.test"),
    ({"HTTPS_PROXY": "proxy.test:3128"}, "https://vllm.test"),
    ({"HTTPS_PROXY": "https://u:p%40w@proxy.test"}, "https://vllm.test"),
    ({"ALL_PROXY": P}, "https://vllm.test"),
    ({"ALL_PROXY": P, "HTTPS_PROXY": "http://other.test:1"}, "https://vllm.test"),
    ({"http_proxy": P, "HTTP_PROXY": "http://upper.test:1"}, "http://vllm.test"),
    ({"http_proxy": "", "HTTP_PROXY": P}, "http://vllm.test"),
    ({"HTTP_PROXY": P, "REQUEST_METHOD": "GET"}, "http://vllm.test"),
    ({"ALL_PROXY": P, "NO_PROXY": "vllm.test"}, "http://vllm.test"),
    ({"ALL_PROXY": P, "NO_PROXY": "vllm.test"}, "http://a.vllm.test"),
    ({"ALL_PROXY": P, "NO_PROXY": "vllm.test"}, "http://xvllm.test"),
    ({"ALL_PROXY": P, "NO_PROXY": ".vllm.test"}, "http://vllm.test"),
    ({"ALL_PROXY": P, "NO_PROXY": ".vllm.test"}, "http://a.vllm.test"),
    ({"ALL_PROXY": P, "NO_PROXY": "VLLM.test"}, "http://vllm.test"),
    ({"ALL_PROXY": P, "NO_PROXY": "vllm.test:8000"}, "http://vllm.test:8000"),
    ({"ALL_PROXY": P, "NO_PROXY": "vllm.test:8000"}, "http://vllm.test:9000"),
    ({"ALL_PROXY": P, "NO_PROXY": "localhost"}, "http://localhost:8000"),
    ({"ALL_PROXY": P, "NO_PROXY": "localhost"}, "http://a.localhost"),
    ({"ALL_PROXY": P, "NO_PROXY": "127.0.0.1"}, "http://127.0.0.1:8000"),
    ({"ALL_PROXY": P, "NO_PROXY": "10.0.0.0/8"}, "http://10.1.2.3"),
    ({"ALL_PROXY": P, "NO_PROXY": "::1"}, "http://[::1]:8000"),
    ({"ALL_PROXY": P, "NO_PROXY": "a.test, *, b.test"}, "http://vllm.test"),
    ({"ALL_PROXY": P, "NO_PROXY": "http://vllm.test"}, "http://vllm.test"),
    ({"ALL_PROXY": P, "NO_PROXY": "http://vllm.test"}, "https://vllm.test"),
    ({"HTTPS_PROXY": P, "NO_PROXY": ""}, "https://vllm.test"),
]


def _httpx_choice(url: str) -> tuple[str, str, int, str | None] | None:
    client = httpx.Client()  # trust_env=True: the Modal probe's setting
    try:
        transport = client._transport_for_url(httpx.URL(url))
        if transport is client._transport:
            return None
        pool = transport._pool  # type: ignore[attr-defined]
        proxy_url = pool._proxy_url
        headers = dict(pool._proxy_headers)
        auth = headers.get(b"Proxy-Authorization")
        default = 443 if proxy_url.scheme == b"https" else 80
        return (
            proxy_url.scheme.decode(),
            proxy_url.host.decode(),
            proxy_url.port or default,
            auth.decode() if auth else None,
        )
    finally:
        client.close()


@pytest.mark.parametrize(("variables", "url"), RULE_CASES, ids=[f"{v}->{u}" for v, u in RULE_CASES])
def test_the_rule_is_httpx_s(env: pytest.MonkeyPatch, variables: dict[str, str], url: str) -> None:
    for name, value in variables.items():
        env.setenv(name, value)
    ours = proxy_url_for(url)
    parsed = parse_proxy(ours) if ours else None
    mine = None if parsed is None else (parsed.scheme, parsed.host, parsed.port, parsed.authorization)
    assert mine == _httpx_choice(url)
