"""WORKERS=N (issue 15): N gateway processes on one port under a supervisor that restarts the dead,
drains all on SIGTERM, gives up when they keep dying, and runs the embedded model once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import grpc
import pytest

from service.config import Settings
from service.shared.workers import WORKER_ENV, Supervisor
from tests.e2e_helpers import free_port, wait_serving_async
from tests.routing_helpers import MODAL_MODEL
from tests.test_shared_redis import GatewayProcess, gateway_env, unary
from tests.upstreams import FakeOpenAI, Ok


def children(pid: int) -> set[int]:
    """The supervisor's worker processes (Linux: /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("needs /proc/<pid>/task/<pid>/children (Linux)")
    return {int(p) for p in path.read_text().split()}


def running(pids: set[int]) -> list[int]:
    """Those of ``pids`` that still exist."""
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


async def wait_for(predicate, timeout_s: float = 30, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def test_workers_setting() -> None:
    assert Settings.from_env({}).workers == 1
    assert Settings.from_env({"WORKERS": "auto"}).workers == len(os.sched_getaffinity(0))
    assert Settings.from_env({"WORKERS": "3"}).workers == 3


def test_each_worker_gets_its_metrics_port_and_instance_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    settings = Settings.from_env({"WORKERS": "3", "METRICS_ADDRESS": "127.0.0.1:9500"})
    env = Supervisor(settings)._worker_env(2)
    assert env[WORKER_ENV] == "2" and env["METRICS_ADDRESS"] == "127.0.0.1:9502"
    instance = f"service.instance.id={socket.gethostname()}-w2"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == f"deployment.environment=test,{instance}"


async def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(tmp_path: Path) -> None:
    with FakeOpenAI(models=[MODAL_MODEL]) as upstream:
        upstream.default = Ok(tokens=["hi"])
        port = free_port()
        env = gateway_env(
            {
                "WORKERS": "2",
                "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}",
                "VASTAI_VLLM_URL": upstream.base_url,
                "VASTAI_MODEL": MODAL_MODEL,
                "METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
            },
            tmp_path,
        )
        gw = GatewayProcess(env, tmp_path)
        try:
            await wait_for(lambda: len(children(gw.proc.pid)) == 2, what="two workers")
            await wait_serving_async(gw.target)
            first = children(gw.proc.pid)
            # Both workers listen on the one port (SO_REUSEPORT); new connections spread over them.
            codes = await asyncio.gather(*(unary(gw.target) for _ in range(20)))
            assert codes == [grpc.StatusCode.OK] * 20

            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            await wait_for(
                lambda: len(children(gw.proc.pid)) == 2 and victim not in children(gw.proc.pid), what="a replacement"
            )
            # The port answers throughout: the surviving worker takes the new connections.
            for _ in range(10):
                assert await unary(gw.target) is grpc.StatusCode.OK
            await wait_serving_async(gw.target)
            assert "exited with -9" in gw.output()

            workers = children(gw.proc.pid)
            assert gw.stop() == 0  # SIGTERM: every worker drained, the supervisor exits 0
            assert not running(workers)
        finally:
            gw.stop()


async def test_workers_that_keep_dying_stop_the_supervisor(tmp_path: Path) -> None:
    # The port is held by a socket without SO_REUSEPORT: every worker fails to bind and dies.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with FakeOpenAI(models=[MODAL_MODEL]) as upstream:
            env = gateway_env(
                {
                    "WORKERS": "2",
                    "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}",
                    "VASTAI_VLLM_URL": upstream.base_url,
                    "VASTAI_MODEL": MODAL_MODEL,
                },
                tmp_path,
            )
            gw = GatewayProcess(env, tmp_path)
            try:
                code = gw.proc.wait(120)
            finally:
                gw.stop()
    assert code == 1, gw.output()
    assert "worker deaths within" in gw.output()


@pytest.mark.e2e
async def test_the_embedded_model_is_started_once_for_all_workers(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = gateway_env(
        {"WORKERS": "2", "GRPC_LISTEN_ADDRESS": address, "TTFT_TIMEOUT_S": "20", "REQUEST_TIMEOUT_S": "60"}, tmp_path
    )
    gw = GatewayProcess(env, tmp_path)
    try:
        await wait_for(lambda: len(children(gw.proc.pid)) == 2, what="two workers", timeout_s=60)
        await wait_serving_async(gw.target)
        codes = await asyncio.gather(*(unary(gw.target) for _ in range(4)))
        assert codes == [grpc.StatusCode.OK] * 4
        out = gw.output()
        assert out.count("shared by the workers") == 1
        assert "embedded llama.cpp serving" not in out  # no worker loaded a model of its own
    finally:
        assert gw.stop() == 0
