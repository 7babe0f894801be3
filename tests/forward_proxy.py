"""A forward HTTP proxy on loopback for tests: absolute-form requests relayed to their origin, and
CONNECT tunnels piped byte for byte. It records what passed through it, so a test can show which
requests went through the proxy, with which headers, and that a tunnel carried only ciphertext."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools


@dataclass
class Passed:
    """One request the proxy saw: ``CONNECT host:port`` or an absolute-form request."""

    method: str
    target: str
    headers: dict[str, str]
    tunnelled: bytearray = field(default_factory=bytearray)  # client bytes inside a CONNECT tunnel


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray | None) -> None:
    try:
        while data := await reader.read(65536):
            if record is not None:
                record += data
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class _ResponseEnd:
    """Finds where one response ends in the upstream's bytes (llhttp, as the client does)."""

    def __init__(self) -> None:
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() >= 200:
            self.done = True


@dataclass
class ForwardProxy:
    """Listens on 127.0.0.1; ``credentials`` ("user:pass") makes it demand Proxy-Authorization."""

    credentials: str | None = None
    passed: list[Passed] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port``."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.credentials is None:
            return True
        import base64

        expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
        return headers.get("proxy-authorization") == expected

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                record = Passed(method, target, headers)
                self.passed.append(record)
                if not self._authorized(headers):
                    writer.write(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=test\r\n"
                        b"content-length: 0\r\n\r\n"
                    )
                    await writer.drain()
                    continue
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await writer.drain()
                    await asyncio.gather(_pipe(reader, up_writer, record.tunnelled), _pipe(up_reader, writer, None))
                    return
                url = urlsplit(target)
                if upstream is None:
                    upstream = await asyncio.open_connection(url.hostname, url.port or 80)
                up_reader, up_writer = upstream
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                path = url.path + (f"?{url.query}" if url.query else "")
                forwarded = [f"{method} {path} HTTP/1.1"] + [
                    line for line in lines[1:] if line and not line.lower().startswith("proxy-authorization:")
                ]
                up_writer.write(("\r\n".join(forwarded) + "\r\n\r\n").encode("latin-1") + body)
                await up_writer.drain()
                end = _ResponseEnd()
                while not end.done:
                    data = await up_reader.read(65536)
                    if not data:
                        return
                    end.parser.feed_data(data)
                    writer.write(data)
                    await writer.drain()
        finally:
            if upstream is not None:
                upstream[1].close()
            writer.close()
