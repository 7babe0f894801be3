"""CPU per call of the gateway's OpenAI-compatible provider (its HTTP/1.1 pool + SSE decoding), in
one uvloop process, without gRPC: the part of a call that the upstream client decides.

Start the fake upstream on the other core, then pin this to one::

    taskset -c 1 python -m bench.fake_upstream --port 8000 --paced bench-model-gap=2 &
    taskset -c 0 python -m bench.provider_cost --url http://127.0.0.1:8000

To compare two versions of the client, run it from each checkout with ``PYTHONPATH`` pointing at
it. Rows: unary at c=1 and c=64, a 64-token stream the upstream sends at once (one network read,
one message), and the paced model (one token per 2 ms, so nearly every token is its own read and
its own message): ``cpu/msg`` there is the client's cost per streamed message.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from service.providers.base import ChatMessage, ChatRequest
from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider

ROWS = [
    # model, stream, concurrency, calls, max_tokens
    ("bench-model", False, 1, 2000, 16),
    ("bench-model", False, 64, 6400, 16),
    ("bench-model", True, 1, 2000, 64),
    ("bench-model", True, 64, 3200, 64),
    ("bench-model-gap", True, 64, 640, 64),
]


async def _row(url: str, model: str, stream: bool, concurrency: int, calls: int, max_tokens: int) -> str:
    provider = OpenAICompatProvider(OpenAICompatConfig(name="bench", base_url=url, model=model, max_connections=512))
    await provider.start()
    request = ChatRequest(
        messages=(ChatMessage("user", "Write one short sentence about benchmarks."),), max_tokens=max_tokens
    )
    messages = 0

    async def caller(n: int) -> None:
        nonlocal messages
        for _ in range(n):
            # Unary calls take the same path in the gateway (the router assembles the stream).
            async for item in provider.stream(request):
                messages += stream and isinstance(item, str)

    await asyncio.gather(*(caller(5) for _ in range(concurrency)))  # connections open, caches warm
    messages = 0
    per_caller = calls // concurrency
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(per_caller) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await provider.aclose()
    done = per_caller * concurrency
    per_msg = f"{1e6 * cpu / messages:6.1f}" if messages else "     -"
    return (
        f"{model:<16} {'stream' if stream else 'unary':<6} c={concurrency:<3} {done:>5} calls  "
        f"cpu/call {1e6 * cpu / done:7.1f} us  msgs/call {messages / done:5.1f}  cpu/msg {per_msg} us  "
        f"wall {wall:5.2f} s"
    )


async def _main(url: str) -> None:
    for row in ROWS:
        print(await _row(url, *row), flush=True)


def main() -> None:
    """Entry point: ``python -m bench.provider_cost --url URL``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the fake upstream (python -m bench.fake_upstream)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(_main(args.url))


if __name__ == "__main__":
    main()
