"""The hot-path HTTP/1.1 pool over real sockets: keep-alive and reuse, stale connections, idle
expiry, TCP keepalive, the pool's own timeout, Host for IPv6, User-Agent, TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
from importlib import metadata
from pathlib import Path

import pytest

from service.providers.http import client as http
from service.providers.http import connection
from service.providers.http.proxies import authority
from tests.rawserver import RawConn, RawServer, ok
from tests.upstreams import FakeOpenAI, Ok, StallBeforeFirstToken


async def test_content_length_and_keep_alive_reuse() -> None:
    with FakeOpenAI(models=["m"]) as upstream:
        upstream.default = Ok(tokens=["a"])
        pool = http.Pool(upstream.base_url, headers={"x-api": "k"})
        for _ in range(5):
            response = await pool.request("GET", "/v1/models")
            assert response.status == 200 and b'"m"' in await response.read()
        assert upstream.connections_accepted == 1
        assert upstream.requests[0].headers["x-api"] == "k"
        assert upstream.requests[0].headers["host"] == f"127.0.0.1:{upstream.port}"
        await pool.aclose()


async def test_user_agent_names_the_gateway_and_its_version() -> None:
    async with RawServer() as server:
        pool = http.Pool(server.url)
        await (await pool.request("GET", "/")).read()
        await pool.aclose()
    assert f"user-agent: inference-gateway/{metadata.version('inference-gateway')}\r\n".encode() in server.requests[0]


async def test_unread_body_closes_the_connection() -> None:
    with FakeOpenAI(models=["m"]) as upstream:
        upstream.default = StallBeforeFirstToken(5.0)
        pool = http.Pool(upstream.base_url)
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


async def test_stale_keep_alive_connection_is_retried_once() -> None:
    async def answer_then_close(conn: RawConn) -> None:
        await conn.request()
        await conn.send(ok(b"ok"))
        conn.close()  # keep-alive promised, then closed while idle

    async with RawServer([answer_then_close, answer_then_close]) as server:
        pool = http.Pool(server.url)
        assert await (await pool.request("GET", "/a")).read() == b"ok"
        await asyncio.sleep(0.05)
        assert await (await pool.request("GET", "/b")).read() == b"ok"
        assert len(server.requests) == 2 and server.connections == 2
        await pool.aclose()


async def test_a_reused_connection_closed_before_any_answer_byte_is_retried_once() -> None:
    async def close_on_second(conn: RawConn) -> None:
        await conn.request()
        await conn.send(ok(b"first"))
        await conn.request()
        conn.close()  # the keep-alive race: the server closes as our request arrives

    async with RawServer([close_on_second]) as server:
        pool = http.Pool(server.url)
        assert await (await pool.request("GET", "/a")).read() == b"first"
        assert await (await pool.request("GET", "/b")).read() == b"second"  # on a fresh connection
        assert server.connections == 2
        await pool.aclose()


async def test_reset_mid_body_is_disconnected() -> None:
    async def cut(conn: RawConn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        conn.reset()

    async with RawServer([cut]) as server:
        pool = http.Pool(server.url)
        response = await pool.request("GET", "/")
        with pytest.raises(http.Disconnected):
            await response.read()
        await pool.aclose()


async def test_refused_connection() -> None:
    pool = http.Pool("http://127.0.0.1:9", connect_timeout_s=1)
    with pytest.raises(http.ConnectFailed):
        await pool.request("GET", "/")
    await pool.aclose()


async def test_pool_bounds_concurrent_connections() -> None:
    open_now = peak = 0

    async def slow(conn: RawConn) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            while await conn.request() is not None:
                await asyncio.sleep(0.02)
                await conn.send(ok(b"!"))
        finally:
            open_now -= 1

    async with RawServer(default=slow) as server:
        pool = http.Pool(server.url, max_connections=3)

        async def one() -> bytes:
            return await (await pool.request("GET", "/")).read()

        assert await asyncio.gather(*(one() for _ in range(12))) == [b"!"] * 12
        assert peak <= 3
        await pool.aclose()


async def test_a_full_pool_times_out_before_sending_anything() -> None:
    async def hold(conn: RawConn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nbusy")  # never finishes

    async with RawServer(default=hold) as server:
        pool = http.Pool(server.url, max_connections=1, pool_timeout_s=0.2)
        busy = await pool.request("GET", "/busy")
        with pytest.raises(http.PoolTimeout, match=r"all 1 connections to http://127\.0\.0\.1:\d+ stayed busy"):
            await pool.request("GET", "/waits")
        assert len(server.requests) == 1  # the second request was never sent
        busy.close()
        await pool.aclose()


async def test_request_heads_are_right_for_every_method_path_and_body() -> None:
    # Heads are encoded once per (method, path) and kept for a few paths only: beyond those, and
    # for each body and extra header, the bytes sent are still exactly the request's own.
    async with RawServer() as server:
        pool = http.Pool(server.url + "/prefix", headers={"authorization": "Bearer k"})
        sent = []
        for n in range(20):
            for method, body, extra in (("GET", None, None), ("POST", b"{}", {"traceparent": f"t{n}"})):
                await (await pool.request(method, f"/p{n % 18}", body, extra)).read()
                sent.append((method, n % 18, body, extra))
        await pool.aclose()
    host = f"127.0.0.1:{server.port}"
    for request, (method, n, body, extra) in zip(server.requests, sent, strict=True):
        expected = f"{method} /prefix/p{n} HTTP/1.1\r\nhost: {host}\r\nuser-agent: {http.USER_AGENT}\r\n"
        expected += "authorization: Bearer k\r\n"
        expected += "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
        expected += f"content-length: {len(body)}\r\n" if body is not None else ""
        assert request == expected.encode() + b"\r\n" + (body or b"")


async def test_waiters_get_the_connection_in_arrival_order_and_a_cancelled_one_is_skipped() -> None:
    async with RawServer() as server:  # answers "second" to every request, on one connection
        pool = http.Pool(server.url, max_connections=1, pool_timeout_s=5)
        held = await pool.request("GET", "/held")
        order: list[str] = []

        async def one(path: str) -> None:
            response = await pool.request("GET", path)
            order.append(path)
            await response.read()

        waiters = [asyncio.ensure_future(one(path)) for path in ("/a", "/b", "/c")]
        await asyncio.sleep(0.01)
        waiters[1].cancel()
        await held.read()  # the connection goes back and passes from waiter to waiter
        await asyncio.gather(*waiters, return_exceptions=True)
        assert order == ["/a", "/c"] and waiters[1].cancelled()
        assert [r.split(b" ")[1] for r in server.requests] == [b"/held", b"/a", b"/c"]
        assert server.connections == 1
        await pool.aclose()


async def test_a_waiter_cancelled_as_it_is_handed_the_connection_passes_it_on() -> None:
    async with RawServer() as server:
        pool = http.Pool(server.url, max_connections=1, pool_timeout_s=5)
        held = await pool.request("GET", "/held")
        first = asyncio.ensure_future(pool.request("GET", "/first"))
        second = asyncio.ensure_future(pool.request("GET", "/second"))
        await asyncio.sleep(0.01)
        await held.read()  # hands the slot to the first waiter...
        first.cancel()  # ...which is cancelled before it runs
        response = await second
        assert await response.read() == b"second" and first.cancelled()
        # Nothing leaked either way: the one connection serves the next request at once.
        assert await (await pool.request("GET", "/next")).read() == b"second"
        await pool.aclose()


async def test_a_pool_timeout_leaves_the_slot_count_whole() -> None:
    async with RawServer() as server:
        pool = http.Pool(server.url, max_connections=2, pool_timeout_s=0.1)
        held = [await pool.request("GET", "/held") for _ in range(2)]
        with pytest.raises(http.PoolTimeout):
            await pool.request("GET", "/late")
        for response in held:
            await response.read()
        responses = await asyncio.gather(*(pool.request("GET", "/again") for _ in range(2)))
        with pytest.raises(http.PoolTimeout):  # and never more than two at once
            await pool.request("GET", "/third")
        assert [await r.read() for r in responses] == [b"second", b"second"]
        await pool.aclose()


async def test_tcp_keepalive_is_on() -> None:
    async with RawServer() as server:
        pool = http.Pool(server.url)
        await (await pool.request("GET", "/")).read()
        transport = pool._idle[0].transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == connection.KEEPALIVE_IDLE_S
        if hasattr(socket, "TCP_KEEPINTVL"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == connection.KEEPALIVE_INTERVAL_S
        if hasattr(socket, "TCP_KEEPCNT"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == connection.KEEPALIVE_COUNT
        await pool.aclose()


async def test_idle_connections_expire_after_30_s_by_default() -> None:
    async with RawServer() as server:
        pool = http.Pool(server.url)
        await (await pool.request("GET", "/")).read()
        left = pool._idle[0].idle_deadline - asyncio.get_running_loop().time()
        assert pool.idle_timeout_s == 30.0 and 29.0 < left <= 30.0
        await pool.aclose()


async def test_idle_connections_expire_as_the_server_says() -> None:
    closed_by_client = asyncio.Event()

    async def short_keep_alive(conn: RawConn) -> None:
        await conn.request()
        await conn.send(ok(b"first", b"keep-alive: timeout=1"))
        await conn.wait_closed()
        closed_by_client.set()

    async with RawServer([short_keep_alive]) as server:
        pool = http.Pool(server.url)
        loop = asyncio.get_running_loop()
        await (await pool.request("GET", "/")).read()
        assert pool._idle[0].idle_deadline - loop.time() <= 0.5  # a margin under the server's 1 s
        async with asyncio.timeout(5):  # generous: the sweep is due after 0.5 s
            await closed_by_client.wait()
        assert not pool._idle
        assert await (await pool.request("GET", "/")).read() == b"second"
        assert server.connections == 2
        await pool.aclose()


async def test_an_expired_connection_is_never_reused() -> None:
    async with RawServer() as server:
        pool = http.Pool(server.url, idle_timeout_s=3600)
        await (await pool.request("GET", "/")).read()
        pool._idle[0].idle_deadline = 0.0  # as if the sweep had not run yet
        await (await pool.request("GET", "/")).read()
        assert server.connections == 2
        await pool.aclose()


def test_host_header_authority() -> None:
    assert authority("::1", 8000, "http") == "[::1]:8000"
    assert authority("::1", 80, "http") == "[::1]"
    assert authority("example.com", 443, "https") == "example.com"
    assert authority("example.com", 443, "http") == "example.com:443"


async def test_ipv6_literal_upstream() -> None:
    try:
        server = await RawServer(host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        pool = http.Pool(server.url)
        assert await (await pool.request("GET", "/v1/models")).read() == b"second"
        assert f"host: [::1]:{server.port}\r\n".encode() in server.requests[0]
        await pool.aclose()
    finally:
        await server.close()


def test_header_values_cannot_split_the_request() -> None:
    with pytest.raises(ValueError, match="line break"):
        http.Pool("http://127.0.0.1:1", headers={"authorization": "Bearer x\r\nx-evil: 1"})


async def test_https(tmp_path: Path) -> None:
    from tests.fakes import issue_pki

    pki = issue_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok(b"secure"))
        await writer.drain()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    pool = http.Pool(f"https://localhost:{port}", ssl_context=client_ctx)
    try:
        assert await (await pool.request("GET", "/")).read() == b"secure"
        untrusted = http.Pool(f"https://localhost:{port}")
        with pytest.raises(http.ConnectFailed):
            await untrusted.request("GET", "/")
    finally:
        await pool.aclose()
        server.close()


def test_the_same_behaviour_under_uvloop(tmp_path: Path) -> None:
    """The service runs on uvloop (these tests on asyncio's loop): interim responses, a reset
    close-delimited body, TCP keepalive and a CONNECT tunnel with TLS inside, on uvloop."""
    uvloop = pytest.importorskip("uvloop")
    from tests.fakes import issue_pki
    from tests.forward_proxy import ForwardProxy

    pki = issue_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_file))

    async def interim_then_reset(conn: RawConn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"first"))
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\ncut")
        conn.reset()

    async def scenario() -> None:
        async with RawServer([interim_then_reset]) as server:
            pool = http.Pool(server.url, max_connections=1)
            assert await (await pool.request("GET", "/1")).read() == b"first"
            sock = pool._idle[0].transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
            with pytest.raises(http.Disconnected):
                await (await pool.request("GET", "/2")).read()
            assert await (await pool.request("GET", "/3")).read() == b"second"
            await pool.aclose()

        async def tls_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ok(b"secure"))
            await writer.drain()

        upstream = await asyncio.start_server(tls_handler, "127.0.0.1", 0, ssl=server_ctx)
        port = upstream.sockets[0].getsockname()[1]
        async with ForwardProxy() as proxy:
            pool = http.Pool(f"https://localhost:{port}", ssl_context=client_ctx, proxy=proxy.url)
            assert await (await pool.request("GET", "/")).read() == b"secure"
            await pool.aclose()
        upstream.close()
        assert [(p.method, p.target) for p in proxy.passed] == [("CONNECT", f"localhost:{port}")]

    uvloop.run(scenario())
