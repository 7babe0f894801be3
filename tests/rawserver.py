"""A scriptable raw-socket HTTP server for client tests: each connection sends exactly the bytes a
test scripts, so framing faults (1xx before the answer, bare LF, resets, junk, huge heads) are
reproduced byte for byte over a real TCP connection on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Script = Callable[["RawConn"], Awaitable[None]]


def ok(body: bytes, *headers: bytes) -> bytes:
    """A complete 200 response framed by Content-Length."""
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@dataclass
class RawConn:
    """One accepted connection, as a script sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: RawServer

    async def request(self) -> bytes | None:
        """Reads one request (head and Content-Length body); None when the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        data = head + (await self.reader.readexactly(length) if length else b"")
        self.server.requests.append(data)
        return data

    async def send(self, data: bytes, piece: int = 0) -> None:
        """Writes ``data``, in writes of ``piece`` bytes when given (each one drained)."""
        step = piece or len(data) or 1
        for i in range(0, len(data), step):
            self.writer.write(data[i : i + step])
            await self.writer.drain()
            if piece:
                await asyncio.sleep(0)

    def reset(self) -> None:
        """Closes with a TCP RST (SO_LINGER 0) instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        """Closes cleanly (FIN)."""
        self.writer.close()

    async def serve(self, body: bytes = b"second") -> None:
        """Answers every further request on this connection with ``ok(body)``, until it closes."""
        while await self.request() is not None:
            await self.send(ok(body))

    async def wait_closed(self) -> None:
        """Returns when the client has closed its side."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass


async def _serve_forever(conn: RawConn) -> None:
    await conn.serve()


@dataclass
class RawServer:
    """Runs ``scripts`` in turn, one per accepted connection, then ``default`` for the rest."""

    scripts: list[Script] = field(default_factory=list)
    default: Script = _serve_forever
    host: str = "127.0.0.1"
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> RawServer:
        """Listens on a free port of ``host``."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        """``http://host:port``, IPv6 in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        script = self.scripts.pop(0) if self.scripts else self.default
        conn = RawConn(reader, writer, self)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await script(conn)
            await conn.wait_closed()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.transport.abort()

    async def __aenter__(self) -> RawServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops listening and drops every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Waits until ``condition()`` holds, for state other objects change without an event to await
    (a bound on a hang, not a timing assertion)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - nothing to await: the state has no event
            await asyncio.sleep(0.01)
