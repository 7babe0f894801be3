"""The hot-path HTTP/1.1 client against scripted raw servers: framing, keep-alive, failures, TLS."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from service.providers.http import client as http1
from tests.upstreams import FakeOpenAI, Ok, StallBeforeFirstToken

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


@pytest_asyncio.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: y\r\n\r\n"
)


@pytest.mark.parametrize("piece", [1, 2, 5, 1000])
async def test_chunked_body_split_anywhere(raw_server: Callable[[Handler], Awaitable[str]], piece: int) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):  # two requests on one kept-alive connection
            await read_request(reader)
            for i in range(0, len(CHUNKED), piece):
                writer.write(CHUNKED[i : i + piece])
                await writer.drain()
        writer.close()

    pool = http1.Pool(await raw_server(handler))
    for _ in range(2):
        response = await pool.request("POST", "/x", b"{}")
        assert response.status == 200 and response.headers["content-type"] == "text/event-stream"
        assert await response.read() == b"hello, world"
    await pool.aclose()


async def test_content_length_and_keep_alive_reuse() -> None:
    with FakeOpenAI(models=["m"]) as upstream:
        upstream.default = Ok(tokens=["a"])
        pool = http1.Pool(upstream.base_url, headers={"x-api": "k"})
        for _ in range(5):
            response = await pool.request("GET", "/v1/models")
            assert response.status == 200 and b'"m"' in await response.read()
        assert upstream.connections_accepted == 1
        assert upstream.requests[0].headers["x-api"] == "k"
        assert upstream.requests[0].headers["host"] == f"127.0.0.1:{upstream.port}"
        await pool.aclose()


async def test_unread_body_closes_the_connection() -> None:
    with FakeOpenAI(models=["m"]) as upstream:
        upstream.default = StallBeforeFirstToken(5.0)
        pool = http1.Pool(upstream.base_url)
        body = b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}'
        response = await pool.request("POST", "/v1/chat/completions", body)
        assert response.status == 200
        response.close()  # walk away mid-stream
        rec = upstream.chat_requests[0]
        await rec.wait_closed_async(1.0)
        assert rec.client_closed
        upstream.default = Ok(tokens=["a"])
        again = await pool.request("GET", "/health")
        await again.read()
        assert upstream.connections_accepted == 2  # the abandoned connection was not reused
        await pool.aclose()


async def test_stale_keep_alive_connection_is_retried_once(raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive promised, then closed while idle

    pool = http1.Pool(await raw_server(handler))
    assert await (await pool.request("GET", "/a")).read() == b"ok"
    await asyncio.sleep(0.05)
    assert await (await pool.request("GET", "/b")).read() == b"ok"
    assert served == 2
    await pool.aclose()


async def test_body_framed_by_connection_close(raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    pool = http1.Pool(await raw_server(handler))
    assert await (await pool.request("GET", "/")).read() == b"until the end"
    await pool.aclose()


async def test_reset_mid_body_is_disconnected(raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.transport.abort()

    pool = http1.Pool(await raw_server(handler))
    response = await pool.request("GET", "/")
    with pytest.raises(http1.Disconnected):
        await response.read()
    await pool.aclose()


@pytest.mark.parametrize(
    "reply",
    [b"SMTP ready\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"],
)
async def test_garbage_is_a_protocol_violation(raw_server: Callable[[Handler], Awaitable[str]], reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(1)

    pool = http1.Pool(await raw_server(handler))
    with pytest.raises(http1.ProtocolViolation):
        response = await pool.request("GET", "/")
        await response.read()
    await pool.aclose()


async def test_refused_connection() -> None:
    pool = http1.Pool("http://127.0.0.1:9", connect_timeout_s=1)
    with pytest.raises(http1.ConnectFailed):
        await pool.request("GET", "/")
    await pool.aclose()


async def test_pool_bounds_concurrent_connections(raw_server: Callable[[Handler], Awaitable[str]]) -> None:
    open_now = peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            while True:
                await read_request(reader)
                await asyncio.sleep(0.02)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n!")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            open_now -= 1

    pool = http1.Pool(await raw_server(handler), max_connections=3)

    async def one() -> bytes:
        return await (await pool.request("GET", "/")).read()

    assert await asyncio.gather(*(one() for _ in range(12))) == [b"!"] * 12
    assert peak <= 3
    await pool.aclose()


async def test_https(tmp_path: object) -> None:
    from pathlib import Path

    from tests.fakes import issue_pki

    pki = issue_pki(Path(str(tmp_path)))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
        await writer.drain()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    pool = http1.Pool(f"https://localhost:{port}", ssl_context=client_ctx)
    try:
        assert await (await pool.request("GET", "/")).read() == b"secure"
        untrusted = http1.Pool(f"https://localhost:{port}")
        with pytest.raises(http1.ConnectFailed):
            await untrusted.request("GET", "/")
    finally:
        await pool.aclose()
        server.close()
