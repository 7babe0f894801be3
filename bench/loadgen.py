"""Load generator: gRPC (the gateway) or OpenAI HTTP (direct upstream, LiteLLM), in worker processes.

Each worker process runs its own uvloop event loop with a few gRPC channels (or one HTTP client
pool) and drives its share of the load:

* closed loop: ``concurrency`` callers, each sending its next request as soon as the last ends;
* open loop: ``rate`` requests/s in total, Poisson or fixed-interval arrivals, whatever the
  latency (capped at ``max_in_flight`` open requests; arrivals over the cap count as errors).

Workers start together (a barrier), warm up for ``warmup_s``, then measure for ``duration_s``.
Latency, time to first token and gaps between chunks are recorded for requests *started* in the
window; throughput counts requests *completed* (and chunks received) in it.

CLI (prints the JSON summary)::

    python -m bench.loadgen --target grpc --address 127.0.0.1:50051 --rpc unary --concurrency 64
    python -m bench.loadgen --target http --address http://127.0.0.1:8000 --rpc stream --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import Samples, summarise

PROMPT = "Write one short sentence about benchmarks."


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load run.

    Attributes:
        target: ``grpc`` (InferenceService) or ``http`` (OpenAI API).
        address: ``host:port`` for gRPC, base URL (no ``/v1``) for HTTP.
        rpc: ``unary`` or ``stream``.
        mode: ``closed`` (``concurrency`` callers) or ``open`` (``rate`` requests/s).
        arrival: Open-loop inter-arrival law: ``poisson`` or ``fixed``.
        max_tokens: Completion length asked for (the fake upstream honours it exactly).
        workers: Worker processes; each gets an equal share of callers or rate.
        channels_per_worker: gRPC channels (separate HTTP/2 connections) per worker.
        http_client: ``raw`` or ``aiohttp`` (HTTP target only).
        model: Model asked for; for gRPC an empty string leaves it to the gateway's default.
        timeout_s: Per-request deadline.
        max_in_flight: Open-loop cap on open requests per worker.
        record_gaps: Keep every inter-chunk gap (off saves client CPU on huge runs).
    """

    target: str
    address: str
    rpc: str = "unary"
    mode: str = "closed"
    concurrency: int = 1
    rate: float = 0.0
    arrival: str = "poisson"
    duration_s: float = 3.0
    warmup_s: float = 1.0
    max_tokens: int = 16
    workers: int = 1
    channels_per_worker: int = 2
    http_client: str = "raw"
    model: str = "bench-model"
    timeout_s: float = 30.0
    max_in_flight: int = 20_000
    record_gaps: bool = True


Call = Callable[[Callable[[float], None]], Awaitable[int]]  # returns completion tokens (streams)


def _split(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


async def _grpc_calls(spec: LoadSpec) -> tuple[list[Call], Callable[[], Awaitable[None]]]:
    """One call function per channel, plus a closer."""
    import grpc
    from inference.v1 import inference_pb2 as pb
    from inference.v1 import inference_pb2_grpc as pb_grpc

    messages = [pb.Message(role=pb.ROLE_USER, content=PROMPT)]
    unary_req = pb.ChatRequest(messages=messages, max_tokens=spec.max_tokens, model=spec.model)
    stream_req = pb.ChatStreamRequest(messages=messages, max_tokens=spec.max_tokens, model=spec.model)
    # A local subchannel pool gives each channel its own TCP connection.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    channels = [grpc.aio.insecure_channel(spec.address, options=options) for _ in range(spec.channels_per_worker)]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), timeout=10)
    calls: list[Call] = []
    timeout = spec.timeout_s
    eof = grpc.aio.EOF
    for ch in channels:
        stub = pb_grpc.InferenceServiceStub(ch)

        if spec.rpc == "unary":

            async def unary(on_text: Callable[[float], None], stub: Any = stub) -> int:
                resp = await stub.Chat(unary_req, timeout=timeout)
                if not resp.message.content:
                    raise ValueError("ChatResponse without text")
                return int(resp.usage.completion_tokens)

            calls.append(unary)
        else:

            async def stream(on_text: Callable[[float], None], stub: Any = stub) -> int:
                call = stub.ChatStream(stream_req, timeout=timeout)
                final = None
                while True:
                    msg = await call.read()
                    if msg is eof:
                        break
                    if msg.HasField("delta"):
                        if msg.delta.text:
                            on_text(time.perf_counter())
                    else:
                        final = msg.final
                if final is None:
                    raise ValueError("stream ended without a final message")
                return int(final.usage.completion_tokens)

            calls.append(stream)

    async def close() -> None:
        for ch in channels:
            await ch.close()

    return calls, close


async def _http_calls(spec: LoadSpec) -> tuple[list[Call], Callable[[], Awaitable[None]]]:
    from bench.http_client import make_client

    client = make_client(spec.http_client, spec.address, spec.model, PROMPT, spec.max_tokens, spec.timeout_s)

    async def unary(on_text: Callable[[float], None]) -> int:
        await client.unary()
        return 0

    async def stream(on_text: Callable[[float], None]) -> int:
        return await client.stream(on_text)

    return [unary if spec.rpc == "unary" else stream], client.aclose


def _error_kind(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return str(code().name)
        except Exception:
            pass
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return f"HTTP_{status}"
    return type(exc).__name__


class _Runner:
    """Drives one worker's share of the load and records samples."""

    def __init__(self, spec: LoadSpec, calls: list[Call], window_start: float, window_end: float) -> None:
        self.spec = spec
        self.calls = calls
        self.ws = window_start
        self.we = window_end
        self.samples = Samples()
        self.in_flight = 0

    async def one(self, call: Call) -> None:
        """One request, timed."""
        s = self.samples
        ws, we = self.ws, self.we
        start = time.perf_counter()
        measured = ws <= start <= we
        first: float | None = None
        last = 0.0
        chunks_in_window = 0
        gaps = s.gaps if (measured and self.spec.record_gaps) else None

        def on_text(t: float) -> None:
            nonlocal first, last, chunks_in_window
            if first is None:
                first = t
            elif gaps is not None:
                gaps.append(t - last)
            last = t
            if ws <= t <= we:
                chunks_in_window += 1

        self.in_flight += 1
        if self.in_flight > s.max_in_flight:
            s.max_in_flight = self.in_flight
        try:
            tokens = await call(on_text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            s.errors_all += 1
            if measured:
                s.error(_error_kind(exc), str(exc), time.perf_counter() - start)
            return
        finally:
            self.in_flight -= 1
            s.chunks += chunks_in_window
        end = time.perf_counter()
        s.completed_all += 1
        if ws <= end <= we:
            s.completed += 1
            if first is not None:
                s.tokens += tokens
        if measured:
            s.started += 1
            s.latency.append(end - start)
            if first is not None:
                s.ttft.append(first - start)

    async def closed(self, callers: int) -> None:
        """``callers`` loops, each issuing its next request when the previous one ends."""

        async def caller(i: int) -> None:
            call = self.calls[i % len(self.calls)]
            while time.perf_counter() < self.we:
                await self.one(call)

        await asyncio.gather(*(caller(i) for i in range(callers)))

    async def open(self, rate: float) -> None:
        """Arrivals at ``rate``/s until the window ends, then waits for the open requests."""
        if rate <= 0:
            return
        tasks: set[asyncio.Task[None]] = set()
        rng = random.Random()
        nxt = time.perf_counter()
        i = 0
        while nxt < self.we:
            delay = nxt - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.in_flight >= self.spec.max_in_flight:
                if self.ws <= nxt <= self.we:
                    self.samples.error("dropped_in_flight_cap", f"{self.in_flight} requests open")
            else:
                task = asyncio.create_task(self.one(self.calls[i % len(self.calls)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
            nxt += rng.expovariate(rate) if self.spec.arrival == "poisson" else 1.0 / rate
        if tasks:
            await asyncio.wait(tasks, timeout=self.spec.timeout_s + 5)


async def _worker_async(spec: LoadSpec, index: int, barrier: Any) -> Samples:
    if spec.target == "grpc":
        calls, close = await _grpc_calls(spec)
    else:
        calls, close = await _http_calls(spec)
    try:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 60.0)
        t0 = time.perf_counter()
        ws = t0 + spec.warmup_s
        runner = _Runner(spec, calls, ws, ws + spec.duration_s)
        if spec.mode == "closed":
            await runner.closed(_split(spec.concurrency, spec.workers, index))
        else:
            await runner.open(spec.rate / spec.workers)
        return runner.samples
    finally:
        await close()


def _worker(spec: LoadSpec, index: int, barrier: Any, queue: Any) -> None:
    """Worker process entry point: runs its loop, ships its samples (or its error) back."""
    try:
        import uvloop

        runner: Callable[..., Samples] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        samples = runner(_worker_async(spec, index, barrier))
        samples.cpu_s = time.process_time()
        queue.put((index, samples, None))
    except BaseException as exc:
        try:
            barrier.abort()
        except Exception:
            pass
        queue.put((index, None, f"{type(exc).__name__}: {exc}"))


def run_load(
    spec: LoadSpec,
    on_window_start: Callable[[], None] | None = None,
    on_window_end: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Runs ``spec`` in ``spec.workers`` processes and returns the summary.

    ``on_window_start``/``on_window_end`` are called in this process when the measurement window
    opens and closes (``bench.run`` samples the system under test's CPU time there).
    """
    ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC state
    barrier = ctx.Barrier(spec.workers + 1)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(spec, i, barrier, queue), daemon=True) for i in range(spec.workers)]
    for p in procs:
        p.start()
    try:
        try:
            barrier.wait(60.0)
        except Exception as exc:
            _, _, err = queue.get(timeout=10)
            raise RuntimeError(f"load workers failed to start: {err or exc}") from exc
        t0 = time.perf_counter()
        if on_window_start is not None:
            time.sleep(max(0.0, t0 + spec.warmup_s - time.perf_counter()))
            on_window_start()
        if on_window_end is not None:
            time.sleep(max(0.0, t0 + spec.warmup_s + spec.duration_s - time.perf_counter()))
            on_window_end()
        merged = Samples()
        deadline = spec.warmup_s + spec.duration_s + spec.timeout_s + 60
        for _ in procs:
            _, samples, err = queue.get(timeout=deadline)
            if err is not None:
                raise RuntimeError(f"load worker failed: {err}")
            merged.merge(samples)
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    summary = summarise(merged, spec.duration_s)
    summary["spec"] = asdict(spec)
    return summary


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="gRPC / OpenAI-HTTP load generator")
    p.add_argument("--target", choices=["grpc", "http"], required=True)
    p.add_argument("--address", required=True, help="host:port (grpc) or http://host:port (http)")
    p.add_argument("--rpc", choices=["unary", "stream"], default="unary")
    p.add_argument("--concurrency", type=int, default=1, help="closed loop: concurrent callers")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s (overrides --concurrency)")
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--channels", type=int, default=2, help="gRPC channels per worker")
    p.add_argument("--http-client", choices=["raw", "aiohttp"], default="raw")
    p.add_argument("--model", default="", help="model to ask for (HTTP default: bench-model)")
    p.add_argument("--timeout", type=float, default=30.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.loadgen``."""
    a = _parse(argv)
    spec = LoadSpec(
        target=a.target,
        address=a.address,
        rpc=a.rpc,
        mode="open" if a.rate > 0 else "closed",
        concurrency=a.concurrency,
        rate=a.rate,
        arrival=a.arrival,
        duration_s=a.duration,
        warmup_s=a.warmup,
        max_tokens=a.max_tokens,
        workers=a.workers,
        channels_per_worker=a.channels,
        http_client=a.http_client,
        model=a.model or ("bench-model" if a.target == "http" else ""),
        timeout_s=a.timeout,
    )
    print(json.dumps(run_load(spec), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
