"""Framing faults over real sockets: for each, the caller gets its own answer or a clear error, and
the next request on the same pool (one connection at most) never sees a byte of the previous one.

The 1xx cases are the data leak of issue 11: the old hand-written client took ``100 Continue`` as
the whole (empty) answer and handed the real one to the next caller on the connection.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import pytest

from service.providers.http import client as http
from service.providers.http.connection import Connection
from tests.rawserver import RawConn, RawServer, Script, ok, until

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
CHUNKED_FIRST = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nfi\r\n3;ext=1\r\nrst\r\n0\r\nx-trailer: y\r\n\r\n"
)


def answer(data: bytes, then: str = "serve", piece: int = 0) -> Script:
    """Reads the request, sends ``data``, then serves ``second`` / closes / resets / holds."""

    async def script(conn: RawConn) -> None:
        await conn.request()
        await conn.send(data, piece)
        if then == "serve":
            await conn.serve()
        elif then == "close":
            conn.close()
        elif then == "reset":
            conn.reset()
        # "hold": say nothing more; the server closes when the client does

    return script


@dataclass(frozen=True)
class Case:
    name: str
    script: Script
    expect: bytes | type[Exception]


CASES = [
    Case("100 Continue before the answer", answer(CONTINUE + ok(b"first")), b"first"),
    Case("103 Early Hints before the answer", answer(EARLY_HINTS + ok(b"first")), b"first"),
    Case("100 and 103 before a chunked answer", answer(CONTINUE + EARLY_HINTS + CHUNKED_FIRST), b"first"),
    Case("100 and 103 split at every byte", answer(CONTINUE + EARLY_HINTS + ok(b"first"), piece=1), b"first"),
    Case("chunked answer split at every byte", answer(CHUNKED_FIRST, piece=1), b"first"),
    Case("100 Continue, then the server closes", answer(CONTINUE, "close"), http.Disconnected),
    Case("bare LF line endings", answer(b"HTTP/1.1 200 OK\ncontent-length: 5\n\nfirst"), http.ProtocolViolation),
    Case("body framed by a clean close", answer(b"HTTP/1.1 200 OK\r\n\r\nfirst", "close"), b"first"),
    Case("RST inside a body framed by close", answer(b"HTTP/1.1 200 OK\r\n\r\nfir", "reset"), http.Disconnected),
    Case("junk after a complete response", answer(ok(b"first") + b"JUNK\r\n\r\n"), b"first"),
    Case("a second, unasked response after the answer", answer(ok(b"first") + ok(b"stray")), b"first"),
    Case("a 204 that carries a body", answer(b"HTTP/1.1 204 No Content\r\n\r\nstray"), b""),
    Case(
        "Connection: close, then more bytes",
        answer(ok(b"first", b"connection: close") + ok(b"stray"), "close"),
        b"first",
    ),
    Case("early close before any byte", answer(b"", "close"), http.Disconnected),
    Case("early close inside the head", answer(b"HTTP/1.1 200 OK\r\ncontent-le", "close"), http.Disconnected),
    Case("close inside a Content-Length body", answer(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nfir", "close"),
         http.Disconnected),
    Case("reset inside a chunked body", answer(CHUNKED_FIRST[:60], "reset"), http.Disconnected),
    Case("101 Switching Protocols", answer(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade"
                                           b"\r\n\r\nRAW"), http.ProtocolViolation),
    Case("Content-Length and chunked together",
         answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\nfirst"),
         http.ProtocolViolation),
    Case("not HTTP at all", answer(b"SSH-2.0-OpenSSH_9.6\r\n"), http.ProtocolViolation),
    Case("a huge header (over 64 KiB)", answer(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000, "hold"),
         http.ProtocolViolation),
    Case("a large header under the limit", answer(ok(b"first", b"x-big: " + b"a" * 32_000)), b"first"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_each_caller_gets_its_own_answer_or_a_clear_error(case: Case) -> None:
    async with RawServer([case.script]) as server:
        pool = http.Pool(server.url, max_connections=1)
        try:
            async with asyncio.timeout(10):  # a hang is a failure here, not a slow pass
                if isinstance(case.expect, bytes):
                    response = await pool.request("GET", "/first")
                    assert await response.read() == case.expect
                else:
                    with pytest.raises(case.expect):
                        response = await pool.request("GET", "/first")
                        await response.read()
                second = await pool.request("GET", "/second")
                assert (second.status, await second.read()) == (200, b"second")
        finally:
            await pool.aclose()


@pytest.mark.parametrize("interim", [CONTINUE, EARLY_HINTS, CONTINUE + EARLY_HINTS])
async def test_an_interim_response_never_hands_an_answer_to_the_next_caller(interim: bytes) -> None:
    async with RawServer([answer(interim + ok(b"first"))]) as server:
        pool = http.Pool(server.url, max_connections=1)
        try:
            async with asyncio.timeout(10):
                bodies = [await (await pool.request("GET", f"/{n}")).read() for n in range(2)]
            assert bodies == [b"first", b"second"]  # the old client: [b"", b"first"]
        finally:
            await pool.aclose()


async def test_unasked_bytes_on_an_idle_connection_close_it() -> None:
    stray_sent = asyncio.Event()

    async def script(conn: RawConn) -> None:
        await conn.request()
        await conn.send(ok(b"first"))
        await asyncio.sleep(0.05)
        await conn.send(ok(b"stray"))
        stray_sent.set()
        await conn.serve()

    async with RawServer([script]) as server:
        pool = http.Pool(server.url, max_connections=1)
        try:
            assert await (await pool.request("GET", "/first")).read() == b"first"
            idle = pool._idle[0]
            await stray_sent.wait()
            await until(lambda: idle.closed)
            assert idle.dirty
            assert await (await pool.request("GET", "/second")).read() == b"second"
            assert server.connections == 2
        finally:
            await pool.aclose()


RESPONSE = (
    EARLY_HINTS + b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nkeep-alive: timeout=9, max=5\r\n"
    b"x-multi: a\r\nx-multi: b\r\n\r\n2\r\nfi\r\n3\r\nrst\r\n0\r\n\r\n"
)


async def _connection() -> tuple[Connection, socket.socket]:
    """A Connection on one end of a real socket pair; bytes are then handed to it directly, so
    every split of a response is exercised deterministically."""
    ours, theirs = socket.socketpair()
    _, conn = await asyncio.get_running_loop().create_connection(Connection, sock=ours)
    conn.start(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    return conn, theirs


@pytest.mark.parametrize("split", range(1, len(RESPONSE)))
async def test_a_response_split_anywhere_parses_the_same(split: int) -> None:
    conn, peer = await _connection()
    try:
        conn.data_received(RESPONSE[:split])
        conn.data_received(RESPONSE[split:])
        assert (conn.status, conn.complete, conn.take(), conn.reusable) == (200, True, b"first", True)
        assert conn.headers["x-multi"] == "a, b" and conn.keep_alive_s == 9
    finally:
        conn.close(abort=True)
        peer.close()


async def test_a_response_fed_one_byte_at_a_time() -> None:
    conn, peer = await _connection()
    try:
        for i in range(len(RESPONSE)):
            conn.data_received(RESPONSE[i : i + 1])
        assert (conn.status, conn.complete, conn.take(), conn.reusable) == (200, True, b"first", True)
    finally:
        conn.close(abort=True)
        peer.close()


async def test_a_second_response_in_the_same_read_never_reaches_the_caller() -> None:
    # The answer's chunks go straight into the body list; the unasked response's chunks after it
    # (here in the same read, chunked too) are cut off again.
    stray = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nstray\r\n3\r\nmore\r\n0\r\n\r\n"
    for split in (len(RESPONSE), len(RESPONSE) + 20, len(RESPONSE + stray) - 3):
        conn, peer = await _connection()
        try:
            data = RESPONSE + stray
            conn.data_received(data[:split])
            conn.data_received(data[split:])
            assert (conn.complete, conn.take(), conn.dirty, conn.reusable) == (True, b"first", True, False)
        finally:
            conn.close(abort=True)
            peer.close()


async def test_a_body_nobody_reads_pauses_the_socket_until_taken() -> None:
    conn, peer = await _connection()
    try:
        assert conn.transport is not None
        conn.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
        for _ in range(16):  # exactly 1 MiB: not over the limit yet
            conn.data_received(piece)
        assert conn.transport.is_reading()
        conn.data_received(piece * 2)
        assert not conn.transport.is_reading()
        assert len(conn.take()) == 18 * 64 * 1024 and conn.transport.is_reading()
        conn.data_received(piece + b"0\r\n\r\n")
        assert (conn.complete, len(conn.take()), conn.reusable) == (True, 64 * 1024, True)
    finally:
        conn.close(abort=True)
        peer.close()
