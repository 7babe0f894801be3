"""A burst of streams far above gRPC core's default pending-call limit is served, not cancelled.

gRPC core cancels calls at random once more than 1,000 are pending acceptance; the server raises
that limit so admission control (RESOURCE_EXHAUSTED with RetryInfo) is the only overload policy.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The burst runs in its own process pair: a server and a client that are both busy, as in production.
CLIENT = r"""
import asyncio, collections, json, sys, grpc
from inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pbg

async def main():
    target, n = sys.argv[1], int(sys.argv[2])
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    stubs = [pbg.InferenceServiceStub(c) for c in channels]
    request = pb.ChatStreamRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")], max_tokens=4)
    codes = collections.Counter()

    async def one(i):
        try:
            async for _ in stubs[i % 4].ChatStream(request, timeout=60):
                pass
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps(dict(codes)))

asyncio.run(main())
"""


async def test_a_burst_of_2000_streams_is_served() -> None:
    from tests.e2e_helpers import free_port, wait_serving_async
    from tests.upstreams import FakeOpenAI, Ok

    with FakeOpenAI(models=["m"]) as upstream:
        upstream.default = Ok(n_tokens=4, delay_s_between_tokens=0.25)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "ANTHROPIC_", "OTEL_"))}
        env |= {
            "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "VASTAI_VLLM_URL": upstream.base_url,
            "VASTAI_MODEL": "m",
            "MAX_CONCURRENT_REQUESTS": "4096",
            "LOG_LEVEL": "WARNING",
        }
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await wait_serving_async(f"127.0.0.1:{port}")
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT, f"127.0.0.1:{port}", "2000", cwd=ROOT, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(client.communicate(), 120)
            codes = collections.Counter(json.loads(out.decode()))
            assert codes == {"OK": 2000}, codes
        finally:
            server.terminate()
            await asyncio.wait_for(server.wait(), 20)
