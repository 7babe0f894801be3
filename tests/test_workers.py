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
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

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


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children of any of its threads, and theirs)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = {int(p) for p in (task / "children").read_text().split()}
            except OSError:  # the thread or process ended meanwhile
                continue
            todo += kids - found
            found |= kids
    return found


def running(pids: set[int]) -> list[int]:
    """Those of ``pids`` that still run (a zombie waiting to be reaped has stopped running)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (SO_REUSEADDR: connections in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


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


def _two_workers(port: int, upstream: FakeOpenAI, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a WORKERS=2 gateway on ``port`` in front of ``upstream``."""
    return gateway_env(
        {
            "WORKERS": "2",
            "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "VASTAI_VLLM_URL": upstream.base_url,
            "VASTAI_MODEL": MODAL_MODEL,
            **extra,
        },
        tmp_path,
    )


async def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(tmp_path: Path) -> None:
    with FakeOpenAI(models=[MODAL_MODEL]) as upstream:
        upstream.default = Ok(tokens=["hi"])
        port = free_port()
        env = _two_workers(port, upstream, tmp_path, METRICS_ADDRESS=f"127.0.0.1:{free_port()}")
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


async def _kill_the_supervisor(gw: GatewayProcess, port: int, timeout_s: float = 30) -> None:
    """Waits for two serving workers, SIGKILLs the supervisor, and waits for everything below it
    to be gone and the port to be free."""
    await wait_for(lambda: len(children(gw.proc.pid)) == 2, what="two workers", timeout_s=timeout_s)
    await wait_serving_async(gw.target)
    # One real call first; the embedded model's first answer on a loaded machine can take well
    # over unary()'s 10 s, so this one gets the whole timeout.
    async with grpc.aio.insecure_channel(gw.target) as channel:
        await pb_grpc.InferenceServiceStub(channel).Chat(
            pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")], max_tokens=4),
            timeout=timeout_s,
            wait_for_ready=True,
        )
    below = descendants(gw.proc.pid)
    assert len(below) >= 2
    gw.proc.kill()
    try:
        assert gw.proc.wait(10) == -signal.SIGKILL
        # A supervisor killed outright (the OOM killer's likely choice: it holds the model) takes its
        # workers with it: no orphan keeps serving the port with a dead supervisor's configuration.
        await wait_for(lambda: not running(below), timeout_s=10, what="the workers to exit")
        await wait_for(lambda: port_is_free(port), timeout_s=5, what="the port to be free")
    finally:
        for pid in running(below):  # only when the test failed: leave no orphan behind
            os.kill(pid, signal.SIGKILL)


async def test_workers_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    with FakeOpenAI(models=[MODAL_MODEL]) as upstream:
        upstream.default = Ok(tokens=["hi"])
        port = free_port()
        env = _two_workers(port, upstream, tmp_path)
        gw = GatewayProcess(env, tmp_path)
        try:
            await _kill_the_supervisor(gw, port)
        finally:
            gw.stop()


async def test_workers_that_keep_dying_stop_the_supervisor(tmp_path: Path) -> None:
    # The port is held by a socket without SO_REUSEPORT: every worker fails to bind and dies.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with FakeOpenAI(models=[MODAL_MODEL]) as upstream:
            env = _two_workers(port, upstream, tmp_path)
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


@pytest.mark.e2e
async def test_nothing_outlives_a_killed_supervisor_that_runs_the_embedded_model(tmp_path: Path) -> None:
    port = free_port()
    env = gateway_env(
        {"WORKERS": "2", "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}", "TTFT_TIMEOUT_S": "20", "REQUEST_TIMEOUT_S": "60"},
        tmp_path,
    )
    gw = GatewayProcess(env, tmp_path)
    try:
        await _kill_the_supervisor(gw, port, timeout_s=60)
        assert "shared by the workers" in gw.output()
    finally:
        gw.stop()
