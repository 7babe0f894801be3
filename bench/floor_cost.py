"""Prices single per-call costs on the floor: bare, + initial metadata, + 1 and 2 pass-through interceptors.

Each variant is ``bench.floor`` pinned to core 0 under the same closed-loop load (load generator on
core 1); variants alternate over ``--rounds`` so machine noise spreads evenly, and the table gives
the median server CPU per call. The differences are what one of the gateway's per-call habits costs
in gRPC and the event loop, with no gateway code at all::

    .venv/bin/python -m bench.floor_cost --rpc unary --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import LoadSpec, run_load
from bench.procs import ProcessGroup, cpu_seconds, free_port, grpc_serving, wait_until

VARIANTS: dict[str, list[str]] = {
    "bare": [],
    "+ initial metadata": ["--initial-metadata"],
    "+ 1 interceptor": ["--interceptors", "1"],
    "+ 2 interceptors": ["--interceptors", "2"],
    "+ initial metadata + 2 interceptors": ["--initial-metadata", "--interceptors", "2"],
}


def measure(group: ProcessGroup, name: str, flags: list[str], rpc: str, duration_s: float) -> dict[str, float]:
    """One variant: start it on core 0, load it, return req/s and server CPU us per call."""
    port = free_port()
    proc = group.start(
        name.replace(" ", "_"),
        [sys.executable, "-m", "bench.floor", "--port", str(port), *flags],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        cpu=0,
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: grpc_serving(target), 30, proc, name)
        marks: dict[str, float] = {}
        spec = LoadSpec(
            target="grpc",
            address=target,
            rpc=rpc,
            concurrency=64,
            duration_s=duration_s,
            warmup_s=1.0,
            max_tokens=16,
            workers=2,
            channels_per_worker=2,
            model="",
        )
        summary: dict[str, Any] = run_load(
            spec,
            lambda: marks.update(c0=cpu_seconds(proc.pid), t0=time.time()),
            lambda: marks.update(c1=cpu_seconds(proc.pid), t1=time.time()),
        )
        done = max(1, int(summary["completed_in_window"]))
        return {
            "rps": float(summary["throughput_rps"]),
            "cpu_us": 1e6 * (marks["c1"] - marks["c0"]) / done,
            "cpu_pct": 100.0 * (marks["c1"] - marks["c0"]) / (marks["t1"] - marks["t0"]),
        }
    finally:
        group.stop(proc)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.floor_cost``."""
    p = argparse.ArgumentParser(description="price per-call costs on the bare grpc.aio floor")
    p.add_argument("--rpc", choices=["unary", "stream"], default="unary")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    a = p.parse_args(argv)
    os.sched_setaffinity(0, {1})  # the load generator (spawned from here) stays off core 0
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in VARIANTS}
    with ProcessGroup(Path(tempfile.mkdtemp(prefix="floor-cost-"))) as group:
        for _ in range(a.rounds):
            for name, flags in VARIANTS.items():
                runs[name].append(measure(group, name, flags, a.rpc, a.duration))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"c=64 {a.rpc}, 16 tokens, floor on core 0, median of {a.rounds}; load average {load}")
    print("| variant | req/s | server CPU % | CPU us per call | vs bare |")
    print("|---|---:|---:|---:|---:|")
    bare = statistics.median(r["cpu_us"] for r in runs["bare"])
    for name, rs in runs.items():
        cpu = statistics.median(r["cpu_us"] for r in rs)
        rps = statistics.median(r["rps"] for r in rs)
        pct = statistics.median(r["cpu_pct"] for r in rs)
        print(f"| {name} | {rps:,.0f} | {pct:.0f} | {cpu:.0f} | {cpu - bare:+.0f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
