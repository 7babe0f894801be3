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

from bench.floor_report import evaluate_floor, relay_steps
from bench.loadgen import LoadSpec, run_load
from bench.procs import ProcessGroup, free_port, grpc_serving, http_ok, process_tree, wait_until
from bench.report import evaluate, markdown
from bench.scenarios import GAP_MODEL, PACED_MODEL

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(upstream base URL, gateway target, floor target), all stopped at the end."""
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
        fl_port = free_port()
        floor = group.start("floor", [sys.executable, "-m", "bench.floor", "--port", str(fl_port)])
        floor_target = f"127.0.0.1:{fl_port}"
        wait_until(lambda: grpc_serving(floor_target), 30, floor, "floor")
        yield base, target, floor_target


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
        **{"model": "bench-model" if target == "http" else "", **kw},  # type: ignore[arg-type]
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
def test_gateway_closed_loop(stack: tuple[str, str, str], rpc: str) -> None:
    """Closed-loop gRPC load through the gateway: results, no errors."""
    _sane(_tiny("grpc", stack[1], rpc), stream=rpc == "stream")


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
def test_direct_http_stream(stack: tuple[str, str, str], client: str) -> None:
    """The OpenAI HTTP clients against the fake upstream's SSE (the direct baseline)."""
    result = _tiny("http", stack[0], "stream", http_client=client)
    _sane(result, stream=True)
    assert result["gap_ms"]["n"] == 7 * result["latency_ms"]["n"]  # type: ignore[index]  # one SSE event per token


def test_open_loop_paced(stack: tuple[str, str, str]) -> None:
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


@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_floor_closed_loop(stack: tuple[str, str, str], rpc: str) -> None:
    """The floor answers the loads the gateway gets; its streams carry one token per message."""
    result = _tiny("grpc", stack[2], rpc, model=GAP_MODEL if rpc == "stream" else "")
    _sane(result, stream=rpc == "stream")
    if rpc == "stream":
        assert result["gap_ms"]["n"] == 7 * result["latency_ms"]["n"]  # type: ignore[index]
        assert result["ttft_ms"]["p50"] >= 1.5  # type: ignore[index]  # paced like the upstream: 2 ms a token


@pytest.mark.parametrize("client", ["raw", "provider"])
@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_relay_floor_goes_upstream(stack: tuple[str, str, str], tmp_path: Path, client: str, rpc: str) -> None:
    """``--relay`` answers every call through the fake upstream, and stops with its group."""
    with ProcessGroup(tmp_path) as group:
        port = free_port()
        cmd = [sys.executable, "-m", "bench.floor", "--port", str(port), "--relay", stack[0], "--relay-client", client]
        relay = group.start(f"relay_{client}", cmd)
        target = f"127.0.0.1:{port}"
        wait_until(lambda: grpc_serving(target), 30, relay, "relay floor")
        result = _tiny("grpc", target, rpc)
        _sane(result, stream=rpc == "stream")
        if rpc == "stream":
            assert result["tokens_per_s"] > 0  # type: ignore[operator]
        group.stop(relay)
        if rpc == "stream":
            return
        # The answers came from upstream: with none there, every call fails.
        dead = free_port()
        cmd[cmd.index(stack[0])] = f"http://127.0.0.1:{free_port()}"
        cmd[cmd.index(str(port))] = str(dead)
        orphan = group.start(f"relay_{client}_no_upstream", cmd)
        wait_until(lambda: grpc_serving(f"127.0.0.1:{dead}"), 30, orphan, "relay floor without upstream")
        failed = _tiny("grpc", f"127.0.0.1:{dead}", rpc)
        assert failed["errors_all"] and not failed["completed_all"], failed
        group.stop(orphan)


def test_relay_steps_leave_the_budget_after_the_upstream_leg() -> None:
    """The relay section: each server's figures in order and what the 1.8x / +0.25 ms targets leave."""
    fl = {"cpu": 200.0, "p50": 0.5, "msgs": 20_000.0, "rps": 4000.0}
    results = _results({"cpu": 500.0, "p50": 0.9, "msgs": 9_000.0, "rps": 2000.0}, fl, 1000, 1600)
    assert relay_steps(results) == {}  # no relay floors in this run: no section
    targets = results["targets"]
    assert isinstance(targets, dict)
    raw = _results(fl, {"cpu": 210.0, "p50": 0.6, "msgs": 18_000.0, "rps": 3800.0}, 0, 0)["targets"]
    prov = _results(fl, {"cpu": 330.0, "p50": 0.7, "msgs": 15_000.0, "rps": 3000.0}, 0, 0)["targets"]
    targets["relay_raw"] = raw["floor"]  # type: ignore[index]
    targets["relay_provider"] = prov["floor"]  # type: ignore[index]
    steps = relay_steps(results)
    assert steps["cpu"]["allowed_us"] == pytest.approx(360.0)
    assert steps["cpu"]["left_after_provider_us"] == pytest.approx(30.0)
    assert steps["cpu"]["gateway_beyond_provider_us"] == pytest.approx(170.0)
    assert steps["c1"]["left_after_provider_ms"] == pytest.approx(0.05)
    results["floor_evaluation"] = evaluate_floor(results)
    text = markdown(results)
    assert "Where the gateway's cost goes" in text and "leaves 30 us" in text


def test_floor_processes_share_a_port(tmp_path: Path) -> None:
    """``--processes 2`` serves one port from two processes (the floor of WORKERS=2), all stopped."""
    with ProcessGroup(tmp_path) as group:
        port = free_port()
        floor = group.start("floor2", [sys.executable, "-m", "bench.floor", "--port", str(port), "--processes", "2"])
        target = f"127.0.0.1:{port}"
        wait_until(lambda: grpc_serving(target), 30, floor, "floor")
        wait_until(lambda: len(process_tree(floor.pid)) == 3, 10, floor, "two floor processes")
        children = process_tree(floor.pid)[1:]
        _sane(_tiny("grpc", target, "unary"), stream=False)
        group.stop(floor)
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)


def _results(gw: dict[str, float], fl: dict[str, float], w1: float, w2: float) -> dict[str, object]:
    def target(v: dict[str, float]) -> dict[str, object]:
        return {
            "scenarios": {
                "c64_unary": {"sut": {"cpu_us_per_request": v["cpu"]}, "throughput_rps": v["rps"]},
                "c1_unary": {"latency_ms": {"p50": v["p50"], "p99": 2 * v["p50"]}},
                "c256_stream_paced": {"chunks_per_s": v["msgs"], "sut": {"cpu_util_pct": 90.0}},
            }
        }

    def run(rps: float, cpu: float) -> dict[str, object]:
        return {"throughput_rps": rps, "sut": {"cpu_util_pct": cpu}, "machine_cpu_busy_pct": 99.0}

    return {
        "targets": {
            "direct": {"scenarios": {"c1_unary": {"latency_ms": {"p50": 0.2, "p99": 0.3}}}},
            "floor": target(fl),
            "gateway": target(gw),
        },
        "workers": {"runs": {"gateway_1": run(w1, 100.0), "gateway_2": run(w2, 190.0), "floor_1": run(4000, 100.0)}},
    }


def test_floor_targets_met_and_not_met() -> None:
    """The per-core verdicts follow the thresholds relative to the floor, both ways."""
    floor = {"cpu": 200.0, "p50": 0.5, "msgs": 20_000.0, "rps": 4000.0}
    good = evaluate_floor(_results({"cpu": 350.0, "p50": 0.7, "msgs": 12_000.0, "rps": 2000.0}, floor, 1000, 1800))
    assert [r["met"] for r in good] == [True, True, True, True]
    assert good[0]["value"] == pytest.approx(1.75) and good[1]["value"] == pytest.approx(0.2)
    bad = evaluate_floor(_results({"cpu": 380.0, "p50": 0.8, "msgs": 9_000.0, "rps": 2000.0}, floor, 1000, 1600))
    assert [r["met"] for r in bad] == [False, False, False, False]
    assert evaluate_floor({"targets": {}})[0]["met"] is None  # not measured is not "met"


def test_report_states_the_floor() -> None:
    """results.md carries the per-core section and the floor's figure beside each absolute target."""
    results = _results({"cpu": 380.0, "p50": 0.8, "msgs": 9_000.0, "rps": 2000.0}, {"cpu": 200.0, "p50": 0.5,
                       "msgs": 20_000.0, "rps": 4000.0}, 1000, 1600)  # fmt: skip
    results["evaluation"] = evaluate(results)
    results["floor_evaluation"] = evaluate_floor(results)
    assert results["evaluation"][0]["floor"] == pytest.approx(0.3)  # the floor's added c=1 p50 over direct
    text = markdown(results)
    assert "Per-core targets vs the floor" in text and "WORKERS=2" in text and "**not met**" in text


def test_profile_counts_cut_main_thread_stacks_as_main() -> None:
    """With thread names (py-spy --threads), a main-thread stack cut short is still the main thread's."""
    from bench.profile import summarise_collapsed

    text = "\n".join(
        [
            "thread (1): MainThread;_run_module_as_main (<frozen runpy>:198);Runner.run (asyncio/runners.py:118) 6",
            "thread (1): MainThread;InferenceServicer.Chat (service/api/servicer.py:131) 3",  # cut short by py-spy
            "thread (2): Thread-1;Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982) 2",
        ]
    )
    summary = summarise_collapsed(text)
    assert (summary["main_busy"], summary["other_threads"]) == (9, 2)
    assert summary["own"][1]["function"] == "InferenceServicer.Chat (service/api/servicer.py)"
    assert [t["thread"] for t in summary["threads"]] == ["MainThread", "Thread-1"]
