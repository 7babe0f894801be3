"""Liveness apart from readiness (issue 15): with every provider down the gateway is not ready ("" and
inference.v1.InferenceService say NOT_SERVING) yet alive (``liveness`` says SERVING), so a liveness
probe restarts nothing during an upstream outage; graceful shutdown turns every name NOT_SERVING."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.healthcheck import check
from service.server import LIVENESS_SERVICE, SERVICE_NAME
from tests.conftest import start_gateway, stop_gateway
from tests.e2e_helpers import free_port
from tests.routing_helpers import MODAL_MODEL, chain_settings
from tests.upstreams import FakeOpenAI

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Refused:
    """An upstream address where nothing listens: every connection is refused."""

    def __init__(self) -> None:
        self.base_url = f"http://127.0.0.1:{free_port()}"


async def status(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    return int((await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status)


async def next_status(watch: Any) -> int:
    """The next status a Watch stream sends (it sends one at once, then one per change)."""
    return int((await asyncio.wait_for(watch.read(), 5)).status)


async def statuses_through_shutdown(running: Any, names: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """Watches ``names``, stops the gateway as SIGTERM does; the statuses before and during the stop."""
    stub = health_pb2_grpc.HealthStub(running.channel)
    # Watchers opened before the shutdown (as Envoy's or a client's health watch would be).
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service=name)) for name in names]
    before = [await next_status(w) for w in watches]
    stopping = asyncio.create_task(running.gateway.stop(grace_s=2.0))
    during = [await next_status(w) for w in watches]
    for w in watches:
        w.cancel()
    await stopping
    return before, during


async def test_every_provider_down_is_not_ready_but_alive_until_shutdown() -> None:
    running = await start_gateway(chain_settings(None, Refused()))
    stopped = False
    try:
        stub = health_pb2_grpc.HealthStub(running.channel)
        # The start-up probe of the only provider was refused: nothing can serve a call now.
        assert await status(stub, "") == NOT_SERVING
        assert await status(stub, SERVICE_NAME) == NOT_SERVING
        assert await status(stub, LIVENESS_SERVICE) == SERVING
        # python -m service.healthcheck asks the same names (blocking grpc: off the gateway's loop).
        env = {"GRPC_LISTEN_ADDRESS": running.target}
        assert not await asyncio.to_thread(check, env)
        assert await asyncio.to_thread(check, env, 4.0, LIVENESS_SERVICE)

        before, during = await statuses_through_shutdown(running, (LIVENESS_SERVICE,))
        stopped = True
        assert (before, during) == ([SERVING], [NOT_SERVING])
    finally:
        await running.channel.close()
        if not stopped:
            await running.gateway.stop(grace_s=0.5)


async def test_graceful_shutdown_turns_readiness_and_liveness_not_serving() -> None:
    upstream = FakeOpenAI(models=[MODAL_MODEL]).start()
    running = await start_gateway(chain_settings(None, upstream))
    stopped = False
    try:
        before, during = await statuses_through_shutdown(running, ("", SERVICE_NAME, LIVENESS_SERVICE))
        stopped = True
        assert before == [SERVING] * 3
        assert during == [NOT_SERVING] * 3
    finally:
        await running.channel.close()
        if not stopped:
            await running.gateway.stop(grace_s=0.5)
        upstream.stop()


async def test_a_misspelt_health_name_fails_instead_of_passing() -> None:
    running = await start_gateway(chain_settings(None, Refused()))
    try:
        stub = health_pb2_grpc.HealthStub(running.channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await status(stub, "livenes")
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        await stop_gateway(running)
