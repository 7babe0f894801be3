"""A keep-alive HTTP/1.1 connection pool on asyncio Protocols, for the OpenAI-compatible hot path.

Why not httpx or aiohttp: inside a grpc.aio server every extra event-loop wake-up is expensive, and
the general clients spend most of their time in machinery this path never uses (redirects,
cookies, auth flows, multipart, decompression). Measured on one core with the bench fake upstream:
a unary call costs ~1,150 us CPU through httpx, ~240 us through aiohttp and ~55 us through a raw
Protocol; in the gateway process an aiohttp call added ~450 us per RPC over a bare grpc.aio server.
The framing is not ours: every response byte goes through llhttp (:mod:`.connection`).

Scope, on purpose: one origin per pool (``http`` or ``https``), requests with a bytes body, no
``HEAD``, keep-alive with a bounded pool, proxies from the environment as httpx reads them
(:mod:`.proxies`: absolute-form requests through an ``http`` proxy, a ``CONNECT`` tunnel for
``https``). A connection goes back to the pool only when its response was read to the end and
nothing else arrived; any other response closes it, which is how a cancelled call tells vLLM to
stop generating.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from importlib import metadata
from urllib.parse import urlsplit

from service.providers.base import connection_wait
from service.providers.http.connection import (
    ConnectFailed,
    Connection,
    Disconnected,
    HTTPError,
    PoolTimeout,
    ProtocolViolation,
)
from service.providers.http.proxies import Proxy, authority, parse_proxy, proxy_for
from service.slots import FifoSlots

__all__ = [
    "USER_AGENT",
    "ConnectFailed",
    "Disconnected",
    "HTTPError",
    "Pool",
    "PoolTimeout",
    "ProtocolViolation",
    "Response",
]

log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_POOL_TIMEOUT_S = 5.0
_MAX_CACHED_HEADS = 16  # encoded request heads kept per pool (the gateway uses three paths)


def _user_agent() -> str:
    try:
        version = metadata.version("inference-gateway")
    except metadata.PackageNotFoundError:
        version = "dev"
    return f"inference-gateway/{version}"


USER_AGENT = _user_agent()


def _idle_expiry_s(conn: Connection, default_s: float) -> float:
    """How long ``conn`` may idle: the pool's limit, or a little under the server's own."""
    server_s = conn.keep_alive_s
    if server_s is None:
        return default_s
    # Leave a margin so the server's timer does not fire while our request is in flight.
    return min(default_s, server_s - min(1.0, server_s / 2))


class Response:
    """A response whose head has arrived; read the body with :meth:`read` or :meth:`iter_chunks`."""

    __slots__ = ("_conn", "_done", "_pool", "headers", "status")

    def __init__(self, pool: Pool, conn: Connection) -> None:
        self._pool = pool
        self._conn = conn
        self._done = False
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        parts: list[bytes] = []
        async for piece in self.iter_chunks():
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def receive(self) -> bytes:
        """The body bytes that arrived since the last call (chunked framing already removed),
        waiting for some when none did; ``b""`` once the body has ended. Raises what broke the
        connection. The caller closes the response.

        A plain coroutine rather than an async generator: a caller that stops early (SSE
        ``[DONE]``) leaves no unfinished generator for the event loop to close in a task of its own.
        """
        conn = self._conn
        while True:
            data = conn.take()
            if data:
                return data
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (chunked framing already removed); closes the response."""
        try:
            while data := await self.receive():
                yield data
        finally:
            self.close()

    async def drain(self, timeout_s: float) -> None:
        """Reads what is left of the body (e.g. the last chunk after SSE ``[DONE]``) for at most
        ``timeout_s`` so the connection can be reused; closes it otherwise."""
        conn = self._conn
        # Usually the body's end came in the same read as [DONE]: then no timer is armed.
        if not conn.complete and conn.error is None:
            try:
                async with asyncio.timeout(timeout_s):
                    while not conn.complete and conn.error is None:
                        conn.take()
                        await conn.wait()
            except TimeoutError:
                pass
        conn.take()
        self.close()

    def close(self) -> None:
        """Returns the connection when the body was read to its end, else closes it."""
        if self._done:
            return
        self._done = True
        self._pool._release(self._conn)


class Pool:
    """Keep-alive connections to one origin, at most ``max_connections`` at once.

    Args:
        base_url: ``http(s)://host[:port][/prefix]``; request paths are appended to the prefix.
        max_connections: Connections open at once (busy or idle).
        connect_timeout_s: TCP connect + TLS handshake (+ proxy tunnel) limit.
        pool_timeout_s: Longest wait for a free connection when all are busy: then
            :class:`PoolTimeout`, raised before anything is sent.
        idle_timeout_s: An idle connection is closed after this long, or sooner when the server's
            ``Keep-Alive: timeout=`` says so.
        headers: Sent with every request (lowercased names; e.g. auth). ``user-agent`` overrides
            :data:`USER_AGENT`.
        ssl_context: For ``https`` origins; the system's default trust otherwise.
        proxy: A proxy URL to use; when None and ``trust_env``, the environment decides
            (:func:`.proxies.proxy_for`).
        trust_env: Read ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY`` as httpx does.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 64,
        connect_timeout_s: float = 3.0,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
        trust_env: bool = True,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.origin = f"{url.scheme}://{authority(self.host, self.port, url.scheme)}"
        self._ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self.proxy: Proxy | None = parse_proxy(proxy) if proxy else (proxy_for(base_url) if trust_env else None)
        self._proxy_ssl = ssl.create_default_context() if self.proxy and self.proxy.scheme == "https" else None
        fixed = {"host": authority(self.host, self.port, url.scheme), "user-agent": USER_AGENT}
        for name, value in (headers or {}).items():
            if any(c in name + value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} holds a line break")
            fixed[name.lower()] = value
        if self.proxy is not None and self.proxy.authorization and self._ssl is None:
            fixed["proxy-authorization"] = self.proxy.authorization  # only the proxy sees plain requests
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        # Through a plain-HTTP proxy the request line carries the whole URL (absolute-form).
        self._target_prefix = (self.origin if self.proxy is not None and self._ssl is None else "") + self.prefix
        self._heads: dict[tuple[str, str], bytes] = {}
        self.max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._pool_timeout_s = pool_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._idle: list[Connection] = []
        self._slots = FifoSlots(max_connections)
        self._sweep_at: float | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    # -- connections ------------------------------------------------------------------------

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        where = f"{self.host}:{self.port}" if proxy is None else f"{self.host}:{self.port} via proxy {proxy.url}"
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if proxy is None:
                    _, conn = await loop.create_connection(
                        Connection,
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl else None,
                    )
                else:
                    _, conn = await loop.create_connection(
                        Connection,
                        proxy.host,
                        proxy.port,
                        ssl=self._proxy_ssl,
                        server_hostname=proxy.host if self._proxy_ssl else None,
                    )
                    if self._ssl is not None:
                        await self._tunnel(loop, conn, proxy)
        except TimeoutError as exc:
            raise ConnectFailed(f"connect to {where} timed out") from exc
        except (OSError, HTTPError) as exc:
            raise ConnectFailed(f"connect to {where} failed: {exc}") from exc
        return conn

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, conn: Connection, proxy: Proxy) -> None:
        """``CONNECT host:port`` through the proxy, then TLS to the origin inside the tunnel."""
        assert self._ssl is not None
        target = authority(self.host, self.port, "")
        auth = f"proxy-authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
        conn.start(f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\nuser-agent: {USER_AGENT}\r\n{auth}\r\n".encode())
        try:
            await conn.wait_head()
            if not 200 <= conn.status < 300:
                raise ConnectFailed(f"the proxy answered {conn.status} to CONNECT {target}")
            if conn.take():
                raise ProtocolViolation("the proxy sent bytes before the TLS handshake")
            assert conn.transport is not None
            tls = await loop.start_tls(conn.transport, conn, self._ssl, server_hostname=self.host)
        except BaseException:
            conn.close(abort=True)
            raise
        if tls is None:
            raise ConnectFailed(f"TLS through the proxy tunnel to {target} was not established")
        conn.tunnel_established(tls)

    def _take_idle(self) -> Connection | None:
        if not self._idle:
            return None
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be stale
            if now < conn.idle_deadline and conn.reusable:
                return conn
            conn.close()
        return None

    def _sweep(self) -> None:
        """Closes the idle connections whose time is up; re-arms for the next one to expire."""
        self._sweeper = self._sweep_at = None
        now = asyncio.get_running_loop().time()
        keep = []
        for conn in self._idle:
            if now < conn.idle_deadline and conn.reusable:
                keep.append(conn)
            else:
                conn.close()
        self._idle[:] = keep
        if keep:
            self._arm_sweeper(min(c.idle_deadline for c in keep))

    def _arm_sweeper(self, at: float) -> None:
        if self._sweep_at is not None and self._sweep_at <= at:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweep_at = at
        self._sweeper = asyncio.get_running_loop().call_at(at, self._sweep)

    def _release(self, conn: Connection) -> None:
        expiry_s = _idle_expiry_s(conn, self.idle_timeout_s)
        if conn.reusable and not self._closed and expiry_s > 0:
            conn.idle_deadline = asyncio.get_running_loop().time() + expiry_s
            self._idle.append(conn)
            self._arm_sweeper(conn.idle_deadline)
        else:
            # Unread body, stray bytes, broken framing or Connection: close: drop it. For a
            # generation this closes the stream upstream, which is what aborts it there.
            conn.close()
        self._slots.release()

    # -- requests ---------------------------------------------------------------------------

    def _encode(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None) -> bytes:
        head = self._heads.get((method, path))
        if head is None:  # the request line and the fixed headers, encoded once per method and path
            head = b"%s %s HTTP/1.1\r\n" % (method.encode(), (self._target_prefix + path).encode()) + self._fixed
            if len(self._heads) < _MAX_CACHED_HEADS:
                self._heads[(method, path)] = head
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1") if headers else b""
        if body is None:
            return head + extra + b"\r\n"
        return b"".join((head, extra, b"content-length: %d\r\n\r\n" % len(body), body))

    async def _wait_for_slot(self) -> None:
        waiting = connection_wait.get()
        if waiting is not None:
            waiting(True)  # the caller's first-token timer stops while we queue for our own pool
        try:
            async with asyncio.timeout(self._pool_timeout_s):
                await self._slots.wait()
        except TimeoutError:
            raise PoolTimeout(
                f"all {self.max_connections} connections to {self.origin} stayed busy for {self._pool_timeout_s:g} s"
            ) from None
        finally:
            if waiting is not None:
                waiting(False)

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        """Sends a request and waits for the final response head (the body streams afterwards).

        The wait for a free connection comes first and ends in :class:`PoolTimeout`; only then is
        anything sent. A kept-alive connection that turns out closed before any byte of an answer
        is replaced once by a fresh one (the server never saw the request).
        """
        if self._closed:
            raise HTTPError("pool is closed")
        data = self._encode(method, path, body, headers)
        if not self._slots.try_take():
            await self._wait_for_slot()
        try:
            for attempt in (0, 1):
                conn = self._take_idle()
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                conn.start(data)
                try:
                    await conn.wait_head()
                except BaseException as exc:
                    conn.close(abort=True)
                    if reused and attempt == 0 and not conn.received_any and isinstance(exc, OSError):
                        continue
                    if isinstance(exc, (asyncio.CancelledError, HTTPError)):
                        raise
                    raise Disconnected(f"connection to {self.origin} lost: {exc}") from exc
                return Response(self, conn)
            raise Disconnected("unreachable")  # pragma: no cover - the loop returns or raises
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        """Closes idle connections; responses in flight close theirs when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = self._sweep_at = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()
