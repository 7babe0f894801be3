"""State shared through Redis (REDIS_URL, issue 15): tenant limits, circuits, Modal warmth and its
one wake-up, across gateway processes; and what happens while Redis is down.

The machine's Redis (127.0.0.1:6379) is started when it is not running; each test writes under a
key prefix of its own in db 9 and deletes it afterwards. The outage test runs a private
redis-server on a free port, never the shared one.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from service.guard.limits import Grant, Refusal
from service.guard.policy import TenantPolicy
from service.routing.health import WakeLease
from service.shared.client import SharedRedis
from service.shared.health import RedisHealth
from service.shared.limits import RedisLimits
from tests.conftest import make_settings, start_gateway, stop_gateway
from tests.e2e_helpers import free_port, wait_serving_async
from tests.routing_helpers import MESSAGES, MODAL_MODEL, call, chain_settings
from tests.upstreams import FakeAnthropic, FakeOpenAI, Ok, Status

ROOT = Path(__file__).resolve().parent.parent
SHARED_REDIS = "redis://127.0.0.1:6379/9"


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def ensure_redis() -> str:
    """The machine's Redis, started if it stopped (REFERENCE.md); skips where none is installed."""
    if _ping(SHARED_REDIS):
        return SHARED_REDIS
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed here and nothing answers on 127.0.0.1:6379")
    subprocess.run(
        [*"redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379".split(), "--save", "", "--appendonly", "no"],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not _ping(SHARED_REDIS):
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not answer on 127.0.0.1:6379")
        time.sleep(0.1)
    return SHARED_REDIS


@pytest.fixture
def redis_prefix() -> Iterator[tuple[str, str]]:
    """(REDIS_URL, a key prefix of this test's own); the keys are deleted afterwards."""
    url = ensure_redis()
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    yield url, prefix
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)


class PrivateRedis:
    """A redis-server of this test's own on a free port, stopped and started at will."""

    def __init__(self, tmp: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _ping(self.url):
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def policy(tenant: str = "t", rpm: int = 0, burst: int = 0, tpm: int = 0, max_concurrent: int = 0) -> TenantPolicy:
    return TenantPolicy(tenant=tenant, rpm=rpm, burst=burst or rpm, tpm=tpm, max_concurrent=max_concurrent)


# ---- the Lua scripts, against the real Redis ------------------------------------------------


async def test_acquire_is_atomic_across_replicas(redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    stores = [RedisLimits(SharedRedis(url, prefix)) for _ in range(4)]  # four "replicas"
    got = await asyncio.gather(*(stores[i % 4].acquire(policy(rpm=10), 0) for i in range(60)))
    grants = [g for g in got if isinstance(g, Grant)]
    assert len(grants) == 10 and all(g.ident for g in grants)
    refusals = [g for g in got if isinstance(g, Refusal)]
    assert {r.limit for r in refusals} == {"rpm"} and all(0 < r.retry_after_s <= 6.01 for r in refusals)
    # A cancelled call gives its request back, once.
    await stores[0].cancel(grants[0])
    assert isinstance(await stores[1].acquire(policy(rpm=10), 0), Grant)
    assert isinstance(await stores[2].acquire(policy(rpm=10), 0), Refusal)
    for s in stores:
        await s._redis.aclose()


async def test_tokens_settle_and_concurrency_slots(redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    a, b = RedisLimits(SharedRedis(url, prefix)), RedisLimits(SharedRedis(url, prefix))
    p = policy(tpm=1000, max_concurrent=2)
    first = await a.acquire(p, 600)
    second = await b.acquire(p, 300)
    assert isinstance(first, Grant) and isinstance(second, Grant)
    over = await a.acquire(p, 50)
    assert over == Refusal("max_concurrent", 1.0)  # two open calls, counted across both
    await a.settle(first, 100)  # used 100 of 600: 500 go back, and the slot
    third = await b.acquire(p, 550)  # 1000 - 100 - 300 = 600 left (plus a trickle of refill)
    assert isinstance(third, Grant)
    too_many = await a.acquire(p, 200)
    assert isinstance(too_many, Refusal) and too_many.limit == "max_concurrent"
    await b.settle(second, 900)  # went over its reservation: 600 more taken, the bucket is in debt
    refused = await a.acquire(p, 10)
    assert isinstance(refused, Refusal) and refused.limit == "tpm" and refused.retry_after_s > 1
    await a.cancel(third)
    for s in (a, b):
        await s._redis.aclose()


class RoundTrips:
    """Counts redis-py's socket writes (one command or one pipeline each: a round trip)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import redis.asyncio.connection as aioconn

        self.count = 0
        original = aioconn.AbstractConnection.send_packed_command

        async def counted(conn: object, command: object, check_health: bool = True) -> None:
            self.count += 1
            await original(conn, command, check_health)  # type: ignore[arg-type]

        monkeypatch.setattr(aioconn.AbstractConnection, "send_packed_command", counted)


async def test_concurrent_calls_share_round_trips_and_stay_exact(
    redis_prefix: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, prefix = redis_prefix
    store = RedisLimits(SharedRedis(url, prefix))
    p = policy(rpm=1000, tpm=100_000, max_concurrent=51)
    assert isinstance(await store.acquire(p, 1), Grant)  # opens the connection before counting
    trips = RoundTrips(monkeypatch)

    async def call() -> None:
        grant = await store.acquire(p, 600)
        assert isinstance(grant, Grant)
        await asyncio.sleep(0)
        await store.settle(grant, 100)

    await asyncio.gather(*(call() for _ in range(50)))
    # 100 scripts in far fewer round trips, and the books are exact: every slot is free, every
    # call charged 100 tokens (plus the first call's 1, unsettled), give or take the refill.
    assert trips.count < 50, trips.count
    client = redis.Redis.from_url(url)
    assert client.zcard(f"{prefix}lim:{{t}}:open") == 1  # the first grant's, never settled
    level = float(client.hget(f"{prefix}lim:{{t}}:tpm", "level") or 0)
    assert 100_000 - 50 * 100 - 1 <= level < 100_000 - 50 * 100 - 1 + 100, level
    await store._redis.aclose()


async def test_a_settle_and_an_acquire_sent_together_run_in_order(redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    store = RedisLimits(SharedRedis(url, prefix))
    p = policy(max_concurrent=1)
    first = await store.acquire(p, 0)
    assert isinstance(first, Grant)
    blocker = asyncio.ensure_future(store.acquire(policy(tenant="other"), 0))  # a round trip in flight
    await asyncio.sleep(0)
    # Both wait for the one in flight and go in one pipeline: the slot is free when the acquire runs.
    _, second = await asyncio.gather(store.settle(first, 0), store.acquire(p, 0))
    assert isinstance(second, Grant), second
    assert isinstance(await store.acquire(p, 0), Refusal)
    await blocker
    await store._redis.aclose()


async def test_a_cancelled_caller_does_not_strand_the_others(redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    store = RedisLimits(SharedRedis(url, prefix))
    p = policy(rpm=100)
    tasks = [asyncio.ensure_future(store.acquire(p, 0)) for _ in range(20)]
    await asyncio.sleep(0)
    tasks[5].cancel()  # queued behind the first round trip
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert isinstance(done[5], asyncio.CancelledError)
    assert all(isinstance(g, Grant) for i, g in enumerate(done) if i != 5)
    await store._redis.aclose()


async def test_batched_scripts_after_a_restart_and_during_an_outage(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    store = RedisLimits(SharedRedis(server.url, "x:"))
    p = policy(rpm=100, max_concurrent=100)
    try:
        first = await store.acquire(p, 0)
        assert isinstance(first, Grant)
        # A restarted Redis has no scripts: the cancel (alone, first) loads its own; the acquires
        # queued behind it go in one pipeline whose EVALSHAs fail with NOSCRIPT, and each is loaded
        # and run again; the grants are Redis's (an ident), not the local fallback's.
        redis.Redis.from_url(server.url).script_flush()
        _, *got = await asyncio.gather(store.cancel(first), *(store.acquire(p, 0) for _ in range(10)))
        assert all(isinstance(g, Grant) and g.ident for g in got), got
        assert store._redis.down is False
        # Redis gone: every caller of a failed pipeline falls back to the local buckets, none hangs.
        server.stop()
        got = await asyncio.wait_for(asyncio.gather(*(store.acquire(p, 0) for _ in range(10))), 5)
        assert all(isinstance(g, Grant) and not g.ident for g in got), got
    finally:
        await store._redis.aclose()
        server.stop()


# ---- processes sharing Redis ----------------------------------------------------------------


def gateway_env(extra: dict[str, str], tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "VASTAI_", "ANTHROPIC_", "PROVIDER_"))}
    env.update(
        {
            "SHUTDOWN_GRACE_S": "2",
            "LEDGER_URL": f"sqlite:///{tmp / f'ledger-{uuid.uuid4().hex[:8]}.sqlite3'}",
            "RETRY_INITIAL_DELAY_S": "0.01",
            "RETRY_MAX_DELAY_S": "0.02",
            "TTFT_TIMEOUT_S": "1.5",
            "REQUEST_TIMEOUT_S": "2",
            "WAKE_POLL_INTERVAL_S": "0.1",
            "MIN_ATTEMPT_TIME_S": "0.05",
            "CONNECT_TIMEOUT_S": "1",
            "HEALTH_CHECK_INTERVAL_S": "3600",
        }
    )
    env.update(extra)
    return env


class GatewayProcess:
    """``python -m service`` with its output in a file."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        port = env.get("GRPC_LISTEN_ADDRESS", "").rpartition(":")[2] or str(free_port())
        env.setdefault("GRPC_LISTEN_ADDRESS", f"127.0.0.1:{port}")
        self.target = env["GRPC_LISTEN_ADDRESS"]
        self.log = tmp / f"gateway-{uuid.uuid4().hex[:8]}.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            # Say what the gateway was doing when it would not stop (seen once under heavy load).
            tail = self.output()[-3000:]
            raise AssertionError(f"gateway did not stop within {timeout_s} s; its log ends:\n{tail}") from None
        finally:
            self._out.close()


async def unary(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await pb_grpc.InferenceServiceStub(channel).Chat(
                pb.ChatRequest(messages=MESSAGES, max_tokens=4), timeout=10, metadata=metadata, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def test_two_processes_share_a_tenants_rpm(redis_prefix: tuple[str, str], tmp_path: Path) -> None:
    url, prefix = redis_prefix
    tenants = tmp_path / "tenants.toml"
    tenants.write_text("[tenants.acme]\nrpm = 10\nburst = 10\n")
    with FakeOpenAI(models=[MODAL_MODEL]) as upstream:
        upstream.default = Ok(tokens=["hi"])
        common = {
            "VASTAI_VLLM_URL": upstream.base_url,
            "VASTAI_MODEL": MODAL_MODEL,
            "INFERENCE_API_KEYS": "acme:acme-secret-token",
            "TENANTS_FILE": str(tenants),
            "REDIS_URL": url,
            "REDIS_KEY_PREFIX": prefix,
        }
        gateways = [GatewayProcess(gateway_env(dict(common), tmp_path), tmp_path) for _ in range(2)]
        try:
            await asyncio.gather(*(wait_serving_async(g.target) for g in gateways))
            auth = (("authorization", "Bearer acme-secret-token"),)
            codes = await asyncio.gather(*(unary(gateways[i % 2].target, auth) for i in range(30)))
            assert codes.count(grpc.StatusCode.OK) == 10, codes
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 20
        finally:
            for g in gateways:
                g.stop()


def _modal_warmth(health: pb.HealthResponse) -> int:
    return next(p.warmth for p in health.providers if p.name == "modal")


async def _wait_warmth(target: str, warmth: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if _modal_warmth(await stub.Health(pb.HealthRequest())) == warmth:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"modal never became {pb.Warmth.Name(warmth)} at {target}")


async def _wait_logged(gateway: GatewayProcess, pattern: str, timeout_s: float = 30) -> str:
    """The gateway's output once ``pattern`` is in it: INFO lines reach the file in batches
    (service/observe/logs.py), so a line logged before a Health answer may not be there yet."""
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, output := gateway.output(), re.M):
        if time.monotonic() > deadline:
            raise AssertionError(f"{gateway.target} never logged {pattern!r}; its log:\n{output}")
        await asyncio.sleep(0.05)
    return output


async def test_one_wake_up_for_callers_across_two_processes(redis_prefix: tuple[str, str], tmp_path: Path) -> None:
    url, prefix = redis_prefix
    modal, vast = FakeOpenAI(models=[MODAL_MODEL]).start(), FakeOpenAI(models=[MODAL_MODEL]).start()
    modal.default, vast.default = Ok(tokens=["m"]), Ok(tokens=["v"])
    modal.stop_listening()  # scaled to zero: the start-up probe finds nothing
    common = {
        "MODAL_WEB_URL": modal.base_url,
        "MODAL_MODEL": MODAL_MODEL,
        "MODAL_VALIDATE_ON_START": "probe",
        "VASTAI_VLLM_URL": vast.base_url,
        "VASTAI_MODEL": MODAL_MODEL,
        "HEALTH_CHECK_TIMEOUT_S": "0.3",
        "REDIS_URL": url,
        "REDIS_KEY_PREFIX": prefix,
        "LOG_LEVEL": "INFO",
    }
    gateways = [GatewayProcess(gateway_env(dict(common), tmp_path), tmp_path) for _ in range(2)]
    try:
        await asyncio.gather(*(wait_serving_async(g.target) for g in gateways))
        channels = [grpc.aio.insecure_channel(g.target) for g in gateways]
        stubs = [pb_grpc.InferenceServiceStub(c) for c in channels]
        outcomes = await asyncio.gather(*(call(stubs[i % 2], "Chat") for i in range(10)))
        assert all(o.code is grpc.StatusCode.OK and o.provider == "vastai" for o in outcomes)
        # Modal stays asleep until both replicas are waking it (callers on each found it cold), so
        # the one wake-up is tested however late either replica's callers arrive on a loaded machine.
        await asyncio.gather(*(_wait_warmth(g.target, pb.WARMTH_WARMING) for g in gateways))
        modal.cold_start(not_listening_s=0.0, unavailable_s=1.0)  # a container starts: 503 for a second
        await asyncio.gather(*(_wait_warmth(g.target, pb.WARMTH_WARM) for g in gateways))
        assert modal.chat_requests == []
        # One replica held the lease and talked to Modal; the other waited for its verdict.
        outputs = await asyncio.gather(*(_wait_logged(g, r"provider modal is warm again") for g in gateways))
        woke = sum(len(re.findall(r"provider modal is warm again$", o, re.M)) for o in outputs)
        followed = sum(o.count("warm again (woken by another replica)") for o in outputs)
        holders = sum(o.count("holds the wake-up lease") for o in outputs)
        assert (woke, followed, holders) == (1, 1, 1), outputs
        probes = sorted((r for r in modal.requests if r.path == "/health"), key=lambda r: r.received_at)
        assert probes
        for earlier, later in itertools.pairwise(probes):
            assert earlier.closed_at is not None and later.received_at >= earlier.closed_at - 0.001
        for stub in stubs:
            o = await call(stub, "Chat")
            assert o.provider == "modal", o
        for c in channels:
            await c.close()
    finally:
        for g in gateways:
            g.stop()
        modal.stop()
        vast.stop()


# ---- circuits, in-process replicas ----------------------------------------------------------


async def test_the_wake_up_lease_and_warmth_are_one_step(redis_prefix: tuple[str, str]) -> None:
    # The race fixed in ed69b85: a replica that read "not warm" just before the holder released the
    # lease (warm) must not take the freed lease and wake Modal a second time. Taking the lease and
    # reading warmth are one script, so after a warm release every other replica hears WARM.
    url, prefix = redis_prefix
    a, b = RedisHealth(SharedRedis(url, prefix)), RedisHealth(SharedRedis(url, prefix))
    b._redis.instance = "replica-b"  # instance ids are per process; two stores in one test need two
    try:
        assert await a.hold_wake("modal", 5) is WakeLease.HELD
        assert await b.hold_wake("modal", 5) is WakeLease.TAKEN  # one wake-up per cluster
        assert await a.hold_wake("modal", 5) is WakeLease.HELD  # the holder renews its own lease
        await a.release_wake("modal", 300)  # the wake-up ended: warm for 5 minutes
        assert await b.hold_wake("modal", 5) is WakeLease.WARM  # not the freed lease
        assert await a.hold_wake("modal", 5) is WakeLease.WARM
    finally:
        await a._redis.aclose()
        await b._redis.aclose()


async def test_a_circuit_opened_by_one_replica_is_open_on_the_other(redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    # An open circuit is still a last resort, so the other replica must have somewhere else to go.
    with FakeOpenAI(models=[MODAL_MODEL]) as bad, FakeAnthropic() as good:
        bad.default = Status(500)
        settings = chain_settings(
            None,
            bad,
            good,
            circuit_failure_threshold=2,
            circuit_cooldown_s=30,
            retry_max_retries=0,
            redis_url=url,
            redis_key_prefix=prefix,
        ).replace(grpc_listen_address="127.0.0.1:0", ledger_url=make_settings().ledger_url)
        a = await start_gateway(settings)
        b = await start_gateway(settings.replace(ledger_url=make_settings().ledger_url))
        try:
            breaker_a, breaker_b = a.gateway.router.slots[0].breaker, b.gateway.router.slots[0].breaker
            for _ in range(2):
                await call(a.stub, "Chat")
            assert breaker_a.state.value == "open"
            deadline = time.monotonic() + 5
            while breaker_b.state.value != "open":
                assert time.monotonic() < deadline, "replica b never saw the open circuit"
                await asyncio.sleep(0.05)
            assert bad.chat_requests and len(bad.chat_requests) == 2  # b sent nothing to find out
            outcome = await call(b.stub, "Chat")
            assert outcome.code is grpc.StatusCode.OK and outcome.provider == "anthropic", outcome
            assert len(bad.chat_requests) == 2
            # A success on a (after its own probe) closes it for b as well.
            bad.default = Ok(tokens=["back"])
            breaker_a.record_success()
            deadline = time.monotonic() + 5
            while breaker_b.state.value != "closed":
                assert time.monotonic() < deadline, "replica b never saw the circuit close"
                await asyncio.sleep(0.05)
        finally:
            await stop_gateway(a)
            await stop_gateway(b)


# ---- Redis down and back --------------------------------------------------------------------


async def test_redis_stopped_mid_run_and_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    prefix = "outage:"
    with FakeOpenAI(models=[MODAL_MODEL]) as upstream:
        upstream.default = Ok(tokens=["hi"])
        settings = make_settings(
            vastai_vllm_url=upstream.base_url,
            vastai_model=MODAL_MODEL,
            inference_api_keys="acme:acme-secret-token",
            rate_limit_rpm=6000,
            redis_url=server.url,
            redis_key_prefix=prefix,
        )
        running = await start_gateway(settings)
        auth = (("authorization", "Bearer acme-secret-token"),)
        target = f"127.0.0.1:{running.gateway.port}"
        client = redis.Redis.from_url(server.url)
        try:
            assert await unary(target, auth) is grpc.StatusCode.OK
            assert client.exists(f"{prefix}lim:{{acme}}:rpm")  # the bucket lives in Redis

            server.stop()
            codes = [await unary(target, auth) for _ in range(20)]
            assert codes == [grpc.StatusCode.OK] * 20  # fail open: the calls go on
            unreachable = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
            assert len(unreachable) == 1  # logged once, not per call

            server.start()
            client = redis.Redis.from_url(server.url)
            assert not client.exists(f"{prefix}lim:{{acme}}:rpm")  # a fresh server: nothing in it
            deadline = time.monotonic() + 10
            while not client.exists(f"{prefix}lim:{{acme}}:rpm"):
                assert time.monotonic() < deadline, "shared limits never resumed after Redis came back"
                assert await unary(target, auth) is grpc.StatusCode.OK
                await asyncio.sleep(0.1)
            assert any("redis is back" in r.getMessage() for r in caplog.records)
        finally:
            await stop_gateway(running)
            server.stop()
