"""CPU cost per upstream request of candidate HTTP clients for the gateway (evidence for the lead).

Runs the same unary and streamed completions against the fake upstream with each client inside
one uvloop process and reports CPU microseconds per request (``time.process_time``) and
per streamed chunk::

    python -m bench.client_cost --url http://127.0.0.1:8000 [--requests 3000] [--concurrency 1 64]

Clients: ``httpx`` (the gateway's today: pooled ``AsyncClient``, ``aiter_raw`` for SSE),
``aiohttp`` (``ClientSession``, ``content.iter_any``), ``raw`` (bench/http_client.py: asyncio
Protocol). Each does what the gateway does with the answer: ``orjson.loads`` of the body / of each
``data:`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from bench.http_client import RawHTTPClient, request_body

PROMPT = "Write one short sentence about benchmarks."


def _sse_lines(buffer: bytes, chunk: bytes) -> tuple[bytes, int]:
    """Parses complete ``data:`` lines like the gateway does; returns the rest and the count."""
    buffer += chunk
    n = 0
    while True:
        nl = buffer.find(b"\n")
        if nl < 0:
            return buffer, n
        line = buffer[:nl]
        buffer = buffer[nl + 1 :]
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload != b"[DONE]":
                orjson.loads(payload)
                n += 1


async def _httpx(url: str, stream: bool, max_tokens: int) -> tuple[Callable[[], Awaitable[int]], Any]:
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=512), timeout=30)
    body = request_body("bench-model", PROMPT, max_tokens, stream)
    full = url + "/v1/chat/completions"
    headers = {"content-type": "application/json"}

    async def unary() -> int:
        r = await client.post(full, content=body, headers=headers)
        orjson.loads(r.content)
        return 0

    async def streamed() -> int:
        req = client.build_request("POST", full, content=body, headers=headers)
        r = await client.send(req, stream=True)
        buf, n = b"", 0
        try:
            async for raw in r.aiter_raw():
                buf, k = _sse_lines(buf, raw)
                n += k
        finally:
            await r.aclose()
        return n

    return (streamed if stream else unary), client.aclose


async def _aiohttp(url: str, stream: bool, max_tokens: int) -> tuple[Callable[[], Awaitable[int]], Any]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
    body = request_body("bench-model", PROMPT, max_tokens, stream)
    full = url + "/v1/chat/completions"
    headers = {"content-type": "application/json"}

    async def unary() -> int:
        async with session.post(full, data=body, headers=headers) as r:
            orjson.loads(await r.read())
        return 0

    async def streamed() -> int:
        buf, n = b"", 0
        async with session.post(full, data=body, headers=headers) as r:
            async for raw in r.content.iter_any():
                buf, k = _sse_lines(buf, raw)
                n += k
        return n

    return (streamed if stream else unary), session.close


async def _raw(url: str, stream: bool, max_tokens: int) -> tuple[Callable[[], Awaitable[int]], Any]:
    client = RawHTTPClient(url, "bench-model", PROMPT, max_tokens, 30.0)

    async def unary() -> int:
        await client.unary()
        return 0

    async def streamed() -> int:
        count = 0

        def on_text(t: float) -> None:
            nonlocal count
            count += 1

        await client.stream(on_text)
        return count + 2  # + the role and usage chunks the other clients count too

    return (streamed if stream else unary), client.aclose


CLIENTS = {"httpx": _httpx, "aiohttp": _aiohttp, "raw": _raw}


async def measure(
    kind: str, url: str, stream: bool, concurrency: int, requests: int, max_tokens: int
) -> dict[str, Any]:
    """CPU and wall time per request of ``requests`` calls at ``concurrency``."""
    call, close = await CLIENTS[kind](url, stream, max_tokens)
    try:
        for _ in range(min(200, requests)):  # warm the pool
            await call()
        per = requests // concurrency
        chunks = 0

        async def worker() -> None:
            nonlocal chunks
            for _ in range(per):
                k = await call()  # not "chunks += await call()": that loses other workers' updates
                chunks += k

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await close()
    n = per * concurrency
    return {
        "client": kind,
        "rpc": "stream" if stream else "unary",
        "concurrency": concurrency,
        "requests": n,
        "cpu_us_per_request": 1e6 * cpu / n,
        "cpu_us_per_chunk": 1e6 * cpu / chunks if chunks else None,
        "wall_us_per_request": 1e6 * wall / n,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.client_cost``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--clients", nargs="+", default=list(CLIENTS))
    a = p.parse_args(argv)
    import uvloop

    rows = []
    for stream, tokens in ((False, 16), (True, 64)):
        for c in a.concurrency:
            for kind in a.clients:
                n = a.requests if not stream else max(c, a.requests // 4)
                row = uvloop.run(measure(kind, a.url, stream, c, n, tokens))
                rows.append(row)
                chunk = row["cpu_us_per_chunk"]
                print(
                    f"{row['rpc']:<6} c={c:<4} {kind:<8} cpu/req {row['cpu_us_per_request']:8.1f} us"
                    + (f"  cpu/chunk {chunk:6.1f} us" if chunk else ""),
                    file=sys.stderr,
                )
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
