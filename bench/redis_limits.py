"""Prices the shared tenant limits: acquire + settle cycles of :class:`service.shared.limits.RedisLimits`
against a real Redis, as the security interceptor runs them around every limited call.

For each policy and concurrency it prints the wall time and this process's CPU per cycle and the
Redis round trips per cycle (counted at redis-py's socket writes: one write of one command or of a
pipeline, then its replies). Keys go under a prefix of the run's own in db 9 and are deleted at the
end. Nothing is pinned; the figures are this process's (the Redis server's CPU is not counted)::

    .venv/bin/python -m bench.redis_limits [--url redis://127.0.0.1:6379/9] [--cycles 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import redis
import redis.asyncio.connection as aioconn

from service.guard.limits import Grant
from service.guard.policy import TenantPolicy
from service.shared.client import SharedRedis
from service.shared.limits import RedisLimits

BIG = 10**9  # limits far above the load: every acquire is granted, and every settle moves tokens
POLICIES = {
    "rpm only": TenantPolicy(tenant="rpm", rpm=BIG, burst=BIG),
    "rpm+tpm": TenantPolicy(tenant="tpm", rpm=BIG, burst=BIG, tpm=BIG),
    "rpm+tpm+max_concurrent": TenantPolicy(tenant="all", rpm=BIG, burst=BIG, tpm=BIG, max_concurrent=10_000),
}
RESERVED, USED = 600, 150  # a call reserves prompt + max_tokens and uses less: settle gives the rest back

writes = 0


def count_writes() -> None:
    """Counts every command (or pipeline) redis-py writes to a socket: one round trip each."""
    original = aioconn.AbstractConnection.send_packed_command

    async def counted(self: Any, command: Any, check_health: bool = True) -> None:
        global writes
        writes += 1
        await original(self, command, check_health)

    aioconn.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


async def cycles(store: RedisLimits, policy: TenantPolicy, total: int, concurrency: int) -> None:
    """``total`` acquire + settle cycles from ``concurrency`` tasks."""
    left = total

    async def one() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            grant = await store.acquire(policy, RESERVED)
            assert isinstance(grant, Grant), grant
            await store.settle(grant, USED)

    await asyncio.gather(*(one() for _ in range(concurrency)))


async def measure(
    url: str, prefix: str, policy: TenantPolicy, total: int, concurrency: int
) -> tuple[float, float, float]:
    """(wall us, CPU us, round trips) per cycle, after a warm-up that opens the connections."""
    shared = SharedRedis(url, prefix)
    store = RedisLimits(shared)
    try:
        await cycles(store, policy, max(concurrency * 4, 100), concurrency)
        before = writes
        wall, cpu = time.perf_counter(), time.process_time()
        await cycles(store, policy, total, concurrency)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert not shared.down, "redis failed during the run: the figures would be the local fallback's"
        return wall / total * 1e6, cpu / total * 1e6, (writes - before) / total
    finally:
        await shared.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="repeats; the table gives the medians")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    count_writes()
    prefix = f"bench-{uuid.uuid4().hex[:12]}:"
    rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        for _ in range(args.rounds):  # rounds outermost: machine noise spreads over every row
            for name, policy in POLICIES.items():
                for c in args.concurrency:
                    rows.setdefault((name, c), []).append(runner(measure(args.url, prefix, policy, args.cycles, c)))
    finally:
        client = redis.Redis.from_url(args.url)
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    print(f"{args.cycles} acquire+settle cycles x {args.rounds} rounds (medians), {args.url}")
    print(f"{'policy':<24} {'conc':>4} {'wall us/cycle':>14} {'CPU us/cycle':>13} {'round trips/cycle':>18}")
    for (name, c), got in rows.items():
        wall, cpu, trips = (statistics.median(x) for x in zip(*got, strict=True))
        print(f"{name:<24} {c:>4} {wall:>14.1f} {cpu:>13.1f} {trips:>18.2f}")


if __name__ == "__main__":
    main()
