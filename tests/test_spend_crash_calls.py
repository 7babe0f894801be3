"""The ledger survives kill -9 of a serving gateway: N calls, SIGKILL one second later, N records.

The records sit in memory for at most one LEDGER_FLUSH_INTERVAL_MS (200 ms) before a batch commits;
this measures that promise end to end, through the real process, its gRPC port and its ledger.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import grpc
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from tests.e2e_helpers import free_port, wait_serving_async
from tests.upstreams import FakeOpenAI, Ok

ROOT = Path(__file__).resolve().parent.parent
N = 40


async def test_kill_9_one_second_after_the_calls_loses_no_record(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    with FakeOpenAI(models=["m"]) as upstream:
        upstream.default = Ok(tokens=["a ", "b"])
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "ANTHROPIC_", "OTEL_", "VASTAI_"))}
        env |= {
            "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "VASTAI_VLLM_URL": upstream.base_url,
            "VASTAI_MODEL": "m",
            "LEDGER_URL": f"sqlite:///{ledger}",
            "LOG_LEVEL": "WARNING",
        }
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            await wait_serving_async(f"127.0.0.1:{port}")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                request = pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")], max_tokens=4)
                answers = await asyncio.gather(*(stub.Chat(request, timeout=30) for _ in range(N)))
            assert len(answers) == N
            await asyncio.sleep(1.0)
            server.send_signal(signal.SIGKILL)
            await server.wait()
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()
    with sqlite3.connect(ledger) as db:
        calls = db.execute("SELECT count(*) FROM usage_records WHERE kind = 'call'").fetchone()[0]
    assert calls == N  # at most one flush interval is ever at risk, and a second is five of them
