"""Smoke test of the benchmark harness: fake upstream + ``python -m service`` + tiny loads.

It checks that the harness produces results with zero errors and sane fields; it never asserts
timing thresholds (those belong to ``python -m bench.run`` on a quiet machine).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.loadgen import LoadSpec, run_load
from bench.procs import ProcessGroup, free_port, grpc_serving, http_ok, wait_until
from bench.scenarios import PACED_MODEL

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(upstream base URL, gateway target), both stopped at the end."""
    with ProcessGroup(tmp_path_factory.mktemp("bench-logs")) as group:
        up_port = free_port()
        upstream = group.start(
            "fake_upstream",
            [sys.executable, "-m", "bench.fake_upstream", "--port", str(up_port), "--paced", f"{PACED_MODEL}=20"],
        )
        base = f"http://127.0.0.1:{up_port}"
        wait_until(lambda: http_ok(base + "/health"), 20, upstream, "fake upstream")
        gw_port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MODAL_", "VASTAI_", "ANTHROPIC_", "PROVIDER_ORDER", "INFERENCE_API_KEYS"))
        }
        env.update(
            {
                "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{gw_port}",
                "VASTAI_VLLM_URL": base,
                "VASTAI_MODEL": "bench-model",
                "MAX_CONCURRENT_REQUESTS": "64",
                "SHUTDOWN_GRACE_S": "1",
                "LOG_LEVEL": "WARNING",
            }
        )
        gateway = group.start("gateway", [sys.executable, "-m", "service"], env=env)
        target = f"127.0.0.1:{gw_port}"
        wait_until(lambda: grpc_serving(target), 60, gateway, "gateway")
        yield base, target


def _tiny(target: str, address: str, rpc: str, **kw: object) -> dict[str, object]:
    spec = LoadSpec(
        target=target,
        address=address,
        rpc=rpc,
        concurrency=4,
        duration_s=0.5,
        warmup_s=0.2,
        max_tokens=8,
        channels_per_worker=2,
        model="bench-model" if target == "http" else "",
        **kw,  # type: ignore[arg-type]
    )
    return run_load(spec)


def _sane(result: dict[str, object], stream: bool) -> None:
    assert result["errors"] == 0, result["error_samples"]
    assert isinstance(result["requests"], int) and result["requests"] > 0
    assert isinstance(result["throughput_rps"], float) and result["throughput_rps"] > 0
    lat = result["latency_ms"]
    assert isinstance(lat, dict)
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    if stream:
        ttft, gaps = result["ttft_ms"], result["gap_ms"]
        assert isinstance(ttft, dict)
        assert ttft["n"] == lat["n"]  # every stream produced a first token
        # The gateway may relay the tokens of one network read as one message: at most 7 gaps.
        assert gaps is None or (isinstance(gaps, dict) and gaps["n"] <= 7 * lat["n"])
        assert isinstance(result["chunks_per_s"], float) and result["chunks_per_s"] > 0
        tokens = result["tokens_per_s"]
        # Both are rates over a window whose edges cut streams differently: compare loosely.
        assert isinstance(tokens, float) and tokens >= 0.9 * result["chunks_per_s"]
    else:
        assert result["ttft_ms"] is None


@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_gateway_closed_loop(stack: tuple[str, str], rpc: str) -> None:
    """Closed-loop gRPC load through the gateway: results, no errors."""
    _sane(_tiny("grpc", stack[1], rpc), stream=rpc == "stream")


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
def test_direct_http_stream(stack: tuple[str, str], client: str) -> None:
    """The OpenAI HTTP clients against the fake upstream's SSE (the direct baseline)."""
    result = _tiny("http", stack[0], "stream", http_client=client)
    _sane(result, stream=True)
    assert result["gap_ms"]["n"] == 7 * result["latency_ms"]["n"]  # type: ignore[index]  # one SSE event per token


def test_open_loop_paced(stack: tuple[str, str]) -> None:
    """Open-loop arrivals on the paced model through the gateway: every started call completes."""
    spec = LoadSpec(
        target="grpc",
        address=stack[1],
        rpc="stream",
        mode="open",
        rate=40.0,
        arrival="fixed",
        duration_s=0.5,
        warmup_s=0.1,
        max_tokens=3,
        model=PACED_MODEL,
    )
    result = run_load(spec)
    assert result["errors"] == 0, result["error_samples"]
    assert result["requests"] >= 10
    assert result["ttft_ms"]["p50"] >= 15  # type: ignore[index]  # first token paced at 20 ms
