"""Shared fixtures: settings, in-process gateways on free loopback ports, the embedded LLM."""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from inference.v1 import inference_pb2_grpc as pb_grpc

from service.config import Settings
from service.providers.base import Provider
from service.server import Gateway

# Every test gateway gets a ledger of its own: spend must never leak from one test (or run) into
# another's budgets.
_LEDGERS = Path(tempfile.mkdtemp(prefix="gateway-test-ledgers-"))
atexit.register(shutil.rmtree, _LEDGERS, True)
_ledger_count = itertools.count()


def make_settings(**overrides: object) -> Settings:
    """Test settings: loopback, port chosen by the OS, fast timeouts, a fresh SQLite ledger; ``overrides`` win."""
    base = Settings(
        grpc_listen_address="127.0.0.1:0",
        shutdown_grace_s=1.0,
        health_check_interval_s=3600,
        ledger_url=f"sqlite:///{_LEDGERS / f'ledger-{next(_ledger_count)}.sqlite3'}",
    )
    return base.replace(**overrides)


class RunningGateway:
    """A started Gateway plus a channel and stub to it."""

    def __init__(self, gateway: Gateway, channel: grpc.aio.Channel) -> None:
        self.gateway = gateway
        self.channel = channel
        self.stub = pb_grpc.InferenceServiceStub(channel)
        self.target = f"127.0.0.1:{gateway.port}"


async def start_gateway(
    settings: Settings, providers: Sequence[Provider] | None = None, **kwargs: object
) -> RunningGateway:
    """Starts a gateway in this event loop."""
    gateway = Gateway(settings, providers, **kwargs)  # type: ignore[arg-type]
    await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    return RunningGateway(gateway, channel)


async def stop_gateway(running: RunningGateway) -> None:
    """Closes the channel and stops the gateway."""
    await running.channel.close()
    await running.gateway.stop(grace_s=0.5)


@pytest_asyncio.fixture(scope="session")
async def local_gateway() -> AsyncIterator[RunningGateway]:
    """One gateway on the real embedded llama.cpp server, shared by the end-to-end tests."""
    running = await start_gateway(make_settings(local_parallel_slots=4))
    yield running
    await stop_gateway(running)


@pytest.fixture
def settings() -> Settings:
    """Default test settings."""
    return make_settings()
