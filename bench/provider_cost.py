"""CPU per call of the gateway's OpenAI-compatible provider (its HTTP/1.1 pool + SSE decoding), in
one uvloop process, without gRPC: the part of a call that the upstream client decides.

Start the fake upstream on the other core, then pin this to one::

    taskset -c 1 python -m bench.fake_upstream --port 8000 --paced bench-model-gap=2 &
    taskset -c 0 python -m bench.provider_cost --url http://127.0.0.1:8000

To compare two versions of the client, export the other one (``git archive <rev> service | tar -x
-C /tmp/old``) and alternate the two in fresh processes, ``--rounds`` times, with medians::

    taskset -c 0 python -m bench.provider_cost --url http://127.0.0.1:8000 --rows unary64 \\
        --rounds 7 --against /tmp/old

Rows: unary at c=1 and c=64 (16 tokens, the gateway's issue-15 scenario), a 64-token stream the
upstream sends at once (one network read, one message), and the paced model (one token per 2 ms,
so nearly every token is its own read and its own message): ``cpu/msg`` there is the client's cost
per streamed message. The machine is shared: expect +-10 % between rounds, compare medians.

``--instructions`` counts instead the instructions per call under valgrind's callgrind (the
difference of two run lengths, so start-up and warm-up cancel): the same to 0.5 % between runs on a
loaded machine, so it shows changes of a few percent that CPU time hides. It does not see the
kernel (a syscall is one instruction), so a change that saves syscalls or wake-ups shows in CPU
time only. With ``--against``, both trees are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time

ROWS = {
    # name: (model, stream, concurrency, calls, max_tokens)
    "unary1": ("bench-model", False, 1, 2000, 16),
    "unary64": ("bench-model", False, 64, 6400, 16),
    "stream1": ("bench-model", True, 1, 2000, 64),
    "stream64": ("bench-model", True, 64, 3200, 64),
    "gap64": ("bench-model-gap", True, 64, 640, 64),
}


async def _row(url: str, model: str, stream: bool, concurrency: int, calls: int, max_tokens: int) -> tuple[str, float]:
    from service.providers.base import ChatMessage, ChatRequest
    from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider

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
    line = (
        f"{model:<16} {'stream' if stream else 'unary':<6} c={concurrency:<3} {done:>5} calls  "
        f"cpu/call {1e6 * cpu / done:7.1f} us  msgs/call {messages / done:5.1f}  cpu/msg {per_msg} us  "
        f"wall {wall:5.2f} s"
    )
    return line, 1e6 * cpu / done


async def _main(url: str, rows: list[str], scale: float) -> None:
    for name in rows:
        model, stream, concurrency, calls, max_tokens = ROWS[name]
        line, cpu_us = await _row(url, model, stream, concurrency, max(concurrency, int(calls * scale)), max_tokens)
        print(f"{line}  [{name} {cpu_us:.1f}]", flush=True)


_CHILD = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); path = sys.argv[2]; "
    "sys.argv = [path, *sys.argv[3:]]; runpy.run_path(path, run_name='__main__')"
)


def _compare(args: argparse.Namespace) -> None:
    """Alternates this tree and ``--against`` in fresh processes; prints each round and medians."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this": here, "against": os.path.abspath(args.against)}
    figures: dict[str, dict[str, list[float]]] = {label: {row: [] for row in args.rows} for label in trees}
    for n in range(args.rounds):
        order = list(trees.items()) if n % 2 == 0 else list(reversed(trees.items()))
        for label, tree in order:
            # This file measures, the tree's service/ is measured (the tree may predate this file).
            cmd = [sys.executable, "-c", _CHILD, tree, os.path.abspath(__file__), "--url", args.url]
            cmd += ["--rows", ",".join(args.rows), "--scale", str(args.scale)]
            out = subprocess.run(cmd, cwd=tree, check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                name, cpu_us = line.rsplit("[", 1)[1].rstrip("]").split()
                figures[label][name].append(float(cpu_us))
            print(f"round {n + 1} {label:<7} " + "  ".join(f"{r} {figures[label][r][-1]:6.1f}" for r in args.rows))
    print(f"medians of {args.rounds} rounds, cpu/call us (this = {here}, against = {trees['against']}):")
    for row in args.rows:
        this, other = statistics.median(figures["this"][row]), statistics.median(figures["against"][row])
        print(f"  {row:<8} this {this:7.1f}  against {other:7.1f}  ratio {this / other:5.3f}")


def _calls(row: str, scale: float) -> int:
    concurrency, calls = ROWS[row][2], ROWS[row][3]
    return max(concurrency, int(calls * scale)) // concurrency * concurrency


def _instructions(args: argparse.Namespace) -> None:
    """Instructions per call of each row under callgrind, for this tree (and ``--against``)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this": here} | ({"against": os.path.abspath(args.against)} if args.against else {})
    short, long = 0.1 * args.scale, 0.3 * args.scale
    for row in args.rows:
        figures: dict[str, float] = {}
        for label, tree in trees.items():
            counts = []
            for scale in (short, long):
                cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", _CHILD]
                cmd += [tree, os.path.abspath(__file__), "--url", args.url, "--rows", row, "--scale", str(scale)]
                err = subprocess.run(cmd, cwd=tree, check=True, capture_output=True, text=True).stderr
                found = re.search(r"Collected : (\d+)", err)
                if found is None:
                    raise SystemExit(f"no instruction count from valgrind:\n{err[-2000:]}")
                counts.append(int(found.group(1)))
            figures[label] = (counts[1] - counts[0]) / (_calls(row, long) - _calls(row, short))
        line = f"  {row:<8} this {figures['this'] / 1e3:8.1f}k instructions/call"
        if "against" in figures:
            line += f"  against {figures['against'] / 1e3:8.1f}k  ratio {figures['this'] / figures['against']:5.3f}"
        print(line, flush=True)


def main() -> None:
    """Entry point: ``python -m bench.provider_cost --url URL``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the fake upstream (python -m bench.fake_upstream)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies each row's number of calls")
    parser.add_argument("--rounds", type=int, default=1, help="with --against: rounds of the two trees")
    parser.add_argument("--against", help="another checkout's root (holding service/) to alternate with")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind instead")
    args = parser.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {list(ROWS)}")
    if args.instructions:
        _instructions(args)
        return
    if args.against:
        _compare(args)
        return
    import uvloop

    uvloop.run(_main(args.url, args.rows, args.scale))


if __name__ == "__main__":
    main()
