"""Runs the whole benchmark: fake upstream, direct baseline, the gateway, LiteLLM, fallback, profiles.

One command::

    .venv/bin/python -m bench.run --out bench/results            # full run, ~8 minutes
    .venv/bin/python -m bench.run --quick --out /tmp/bench-quick  # a few-second smoke (no LiteLLM)

Placement on the 2-core machine: the system under test (the gateway or LiteLLM) runs alone on core
0 (``taskset -c 0``); this orchestrator, the load-generator workers, py-spy and the fake upstream
run on core 1. All traffic stays on 127.0.0.1. Every process started here is stopped at the end,
on errors and on Ctrl-C (and dies with this process if it is killed: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.loadgen import LoadSpec, run_load
from bench.procs import (
    ProcessGroup,
    RSSSampler,
    cpu_seconds,
    free_port,
    grpc_serving,
    http_ok,
    machine_cpu,
    rss_bytes,
    wait_until,
)
from bench.report import write_all
from bench.scenarios import (
    FALLBACK_CONFIGS,
    FALLBACK_SCENARIO,
    FULL,
    GAP_DELAY_MS,
    GAP_MODEL,
    PACED_DELAY_MS,
    PACED_MODEL,
    QUICK,
    WORKERS_SCENARIO,
    WORKERS_SCENARIO_QUICK,
    Scenario,
)

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
STAGES = ("direct", "floor", "relay", "gateway", "workers", "fallback", "litellm")
# The relay floors (``bench.floor --relay``) run the scenarios the per-core targets read.
RELAY_SCENARIOS = ("c1_unary", "c64_unary", "c256_unary", "c256_stream_paced")
RELAY_CLIENTS = ("raw", "provider")
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
# Variables of the caller's environment that would change what the gateway does.
_GATEWAY_ENV_PREFIXES = (
    "MODAL_",
    "VASTAI_",
    "ANTHROPIC_",
    "PROVIDER_ORDER",
    "INFERENCE_API_KEYS",
    "ADMIN_API_KEYS",
    "RATE_LIMIT_",
    "TLS_",
    "COLD_START_",
    "RETRY_",
    "CIRCUIT_",
    "OTEL_",
    "METRICS_PORT",
)


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    """State of one benchmark run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.quick: bool = args.quick
        self.scenarios = QUICK if self.quick else FULL
        self.pin = (os.cpu_count() or 1) >= 2 and not args.no_pin
        self.sut_cpu = 0 if self.pin else None
        self.side_cpu = 1 if self.pin else None
        self.group = ProcessGroup(self.out / "logs")
        self.http_client = args.http_client
        self.upstream_pid = 0
        self.upstream_url = ""
        self.results: dict[str, Any] = {
            "meta": {
                "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "mode": "quick" if self.quick else "full",
                "cpus": os.cpu_count(),
                "pinning": "SUT on core 0, upstream + load generator on core 1"
                if self.pin
                else "no pinning (fewer than 2 cores or --no-pin)",
                "loadavg_before": _loadavg(),
                "git": _git_rev(),
                "python": sys.version.split()[0],
            },
            "scenario_titles": {s.key: s.title for s in self.scenarios},
            "targets": {},
        }

    # ---- processes ----------------------------------------------------------------------

    def start_upstream(self) -> None:
        """The fake upstream, one process on the side core."""
        port = free_port()
        proc = self.group.start(
            "fake_upstream",
            [
                sys.executable,
                "-m",
                "bench.fake_upstream",
                "--port",
                str(port),
                "--paced",
                f"{PACED_MODEL}={PACED_DELAY_MS:g}",
                "--paced",
                f"{GAP_MODEL}={GAP_DELAY_MS:g}",
            ],
            env=_env(),
            cpu=self.side_cpu,
        )
        self.upstream_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(self.upstream_url + "/health"), 20, proc, "fake upstream")
        self.upstream_pid = proc.pid
        log(f"fake upstream on {self.upstream_url} (pid {proc.pid})")

    def start_floor(
        self, name: str = "floor", processes: int = 1, cpu: int | str | None = "sut", relay: str = ""
    ) -> tuple[Any, str]:
        """The floor (``bench.floor``: bare grpc.aio from memory), by default on the SUT core;
        ``relay`` (``raw`` or ``provider``): the relay floor of that client, to the fake upstream."""
        port = free_port()
        cmd = [sys.executable, "-m", "bench.floor", "--port", str(port), "--processes", str(processes)]
        if relay:
            cmd += ["--relay", self.upstream_url, "--relay-client", relay]
        proc = self.group.start(name, cmd, env=_env(), cpu=self.sut_cpu if cpu == "sut" else cpu)  # type: ignore[arg-type]
        target = f"127.0.0.1:{port}"
        wait_until(lambda: grpc_serving(target), 30, proc, name)
        log(f"{name} serving on {target} (pid {proc.pid})")
        return proc, target

    def start_gateway(
        self, name: str, extra_env: dict[str, str] | None = None, cpu: int | str | None = "sut"
    ) -> tuple[Any, str]:
        """``python -m service`` on the SUT core (``cpu=None``: unpinned), pointed at the fake upstream."""
        port = free_port()
        env = {k: v for k, v in _env().items() if not k.startswith(_GATEWAY_ENV_PREFIXES)}
        env.update(
            {
                "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}",
                "VASTAI_VLLM_URL": self.upstream_url,
                "VASTAI_MODEL": "bench-model",
                # Above the largest scenario, so admission control never rejects benchmark load.
                "MAX_CONCURRENT_REQUESTS": "4096",
                "SHUTDOWN_GRACE_S": "2",
            }
        )
        env.update(extra_env or {})
        pin = self.sut_cpu if cpu == "sut" else cpu
        proc = self.group.start(name, [sys.executable, "-m", "service"], env=env, cpu=pin)  # type: ignore[arg-type]
        target = f"127.0.0.1:{port}"
        wait_until(lambda: grpc_serving(target), 60, proc, name)
        log(f"{name} serving on {target} (pid {proc.pid})")
        return proc, target

    # ---- one target ----------------------------------------------------------------------

    def spec(self, sc: Scenario, target: str, address: str, grpc_default_model: bool = True) -> LoadSpec:
        """The load spec of ``sc`` against one target."""
        model = sc.model
        if target == "grpc" and not sc.paced and not sc.upstream_model and grpc_default_model:
            model = ""  # the gateway's configured default (VASTAI_MODEL)
        return LoadSpec(
            target=target,
            address=address,
            rpc=sc.rpc,
            mode="open" if sc.rate > 0 else "closed",
            concurrency=sc.concurrency,
            rate=sc.rate,
            duration_s=sc.duration_s,
            warmup_s=sc.warmup_s,
            max_tokens=sc.max_tokens,
            workers=sc.workers,
            channels_per_worker=sc.channels,
            http_client=self.http_client,
            model=model,
            timeout_s=sc.timeout_s,
        )

    def measure(self, sc: Scenario, spec: LoadSpec, sut_pid: int) -> dict[str, Any]:
        """Runs one load with RSS sampling and CPU accounting of the SUT and the upstream."""
        marks: dict[str, float] = {}

        def start() -> None:
            marks["sut0"], marks["up0"], marks["t0"] = cpu_seconds(sut_pid), cpu_seconds(self.upstream_pid), time.time()
            marks["m_busy0"], marks["m_all0"] = machine_cpu()

        def end() -> None:
            marks["sut1"], marks["up1"], marks["t1"] = cpu_seconds(sut_pid), cpu_seconds(self.upstream_pid), time.time()
            marks["m_busy1"], marks["m_all1"] = machine_cpu()

        idle = rss_bytes(sut_pid)
        sampler = RSSSampler(sut_pid)
        with sampler.running():
            summary = run_load(spec, start, end)
        window = max(1e-9, marks["t1"] - marks["t0"])
        sut_cpu = marks["sut1"] - marks["sut0"]
        summary["sut"] = {
            "pid": sut_pid,
            "rss_idle_mb": idle / MB,
            "rss_peak_mb": sampler.peak / MB,
            "cpu_util_pct": 100.0 * sut_cpu / window,
            "cpu_us_per_request": 1e6 * sut_cpu / summary["completed_in_window"]
            if summary["completed_in_window"]
            else None,
        }
        summary["upstream_cpu_util_pct"] = 100.0 * (marks["up1"] - marks["up0"]) / window
        # Every core's busy share over the window (this run's processes and anyone else's).
        m_all = max(1e-9, marks["m_all1"] - marks["m_all0"])
        summary["machine_cpu_busy_pct"] = 100.0 * (marks["m_busy1"] - marks["m_busy0"]) / m_all
        summary["client_cpu_util_pct"] = 100.0 * summary["client_cpu_s"] / (sc.warmup_s + sc.duration_s)
        lat = summary.get("latency_ms") or {}
        ttft = summary.get("ttft_ms") or {}
        log(
            f"  {sc.key:<14} {summary['throughput_rps']:>8.0f} req/s  p50 {lat.get('p50', 0):8.3f} ms  "
            f"p99 {lat.get('p99', 0):8.3f} ms  ttft50 {ttft.get('p50', 0):7.3f}  "
            f"chunks/s {summary['chunks_per_s']:>8.0f}  err {summary['errors']}  "
            f"cpu {summary['sut']['cpu_util_pct']:.0f}%  rss {summary['sut']['rss_peak_mb']:.0f} MB"
        )
        return summary

    def run_target(
        self, name: str, target: str, address: str, sut_pid: int, only: tuple[str, ...] | None = None
    ) -> None:
        """Every scenario (or those in ``only``) against one target; results land in
        ``self.results`` as they come."""
        log(f"target {name}")
        entry: dict[str, Any] = {"address": address, "idle_rss_mb": rss_bytes(sut_pid) / MB, "scenarios": {}}
        self.results["targets"][name] = entry
        for sc in self.scenarios:
            if only is not None and sc.key not in only:
                continue
            try:
                entry["scenarios"][sc.key] = self.measure(sc, self.spec(sc, target, address), sut_pid)
            except Exception as exc:  # one broken scenario must not lose the others
                log(f"  {sc.key} failed: {exc}")
                entry.setdefault("failures", {})[sc.key] = f"{type(exc).__name__}: {exc}"

    # ---- pieces --------------------------------------------------------------------------

    def calibrate_http_client(self) -> None:
        """Measures both HTTP clients on the direct baseline; keeps the one that adds less."""
        if self.http_client != "auto":
            self.results["meta"]["http_client"] = self.http_client
            self.results["meta"]["http_client_reason"] = "chosen with --http-client"
            return
        if self.quick:
            self.http_client = "raw"
            self.results["meta"].update(http_client="raw", http_client_reason="quick mode: no calibration")
            return
        cal: dict[str, dict[str, float]] = {}
        for kind in ("raw", "aiohttp"):
            self.http_client = kind
            c1 = run_load(
                self.spec(Scenario("cal", "", "unary", 1, warmup_s=0.5, duration_s=2.0), "http", self.upstream_url)
            )
            c64 = run_load(
                self.spec(
                    Scenario("cal", "", "unary", 64, warmup_s=0.5, duration_s=2.0, workers=2), "http", self.upstream_url
                )
            )
            cal[kind] = {
                "c1_p50_ms": (c1["latency_ms"] or {}).get("p50", float("inf")),
                "c1_p99_ms": (c1["latency_ms"] or {}).get("p99", float("inf")),
                "c64_rps": c64["throughput_rps"],
            }
            log(f"  HTTP client {kind}: c=1 p50 {cal[kind]['c1_p50_ms']:.3f} ms, c=64 {cal[kind]['c64_rps']:.0f} req/s")
        best = min(cal, key=lambda k: cal[k]["c1_p50_ms"])
        self.http_client = best
        other = "aiohttp" if best == "raw" else "raw"
        self.results["meta"].update(
            http_client=best,
            http_client_calibration=cal,
            http_client_reason=f"c=1 p50 {cal[best]['c1_p50_ms']:.3f} ms vs {cal[other]['c1_p50_ms']:.3f} ms for "
            f"{other}; c=64 {cal[best]['c64_rps']:.0f} vs {cal[other]['c64_rps']:.0f} req/s",
        )

    def gateway(self) -> None:
        """The gateway's scenarios, then (optionally) its profiles."""
        proc, target = self.start_gateway("gateway")
        try:
            self.run_target("gateway", "grpc", target, proc.pid)
            if self.args.profile:
                from bench.profiling import profile_gateway

                self.results["profiles"] = profile_gateway(self, target, proc.pid, native=self.args.profile_native)
        finally:
            self.group.stop(proc)

    def floor(self) -> None:
        """The floor's scenarios: the same loads against a bare grpc.aio server on the SUT core."""
        proc, target = self.start_floor()
        try:
            self.run_target("floor", "grpc", target, proc.pid)
        finally:
            self.group.stop(proc)

    def relay(self) -> None:
        """The relay floors: the floor plus the upstream leg, over a raw exchange and over the
        gateway's own provider (``bench.floor --relay``), on the scenarios the per-core targets read."""
        for client in RELAY_CLIENTS:
            proc, target = self.start_floor(f"relay_{client}", relay=client)
            try:
                self.run_target(f"relay_{client}", "grpc", target, proc.pid, only=RELAY_SCENARIOS)
            finally:
                self.group.stop(proc)

    def workers(self) -> None:
        """``WORKERS=1`` vs ``WORKERS=2`` (and the floor with 1 and 2 processes), nothing pinned.

        Scale-out uses both cores, so here nothing is pinned: the servers, the load generator and
        the fake upstream share the machine as they would in production on a 2-core host, and the
        machine's busy share over the window says whether cores were left for a second worker.
        """
        sc = WORKERS_SCENARIO_QUICK if self.quick else WORKERS_SCENARIO
        out: dict[str, Any] = {"scenario": sc.title, "runs": {}}
        self.results["workers"] = out
        log(f"workers ({sc.title}, nothing pinned)")
        runs = (
            ("floor_1", lambda: self.start_floor("floor_1", 1, cpu=None)),
            ("floor_2", lambda: self.start_floor("floor_2", 2, cpu=None)),
            ("gateway_1", lambda: self.start_gateway("gateway_w1", {"WORKERS": "1"}, cpu=None)),
            ("gateway_2", lambda: self.start_gateway("gateway_w2", {"WORKERS": "2"}, cpu=None)),
        )
        pinned = os.sched_getaffinity(0)
        # The load workers are spawned from here and inherit this affinity: all cores for this stage.
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        try:
            self._workers_runs(sc, runs, out)
        finally:
            os.sched_setaffinity(0, pinned)

    def _workers_runs(self, sc: Scenario, runs: Any, out: dict[str, Any]) -> None:
        for key, start in runs:
            proc = None
            try:
                proc, target = start()
                summary = self.measure(sc, self.spec(sc, "grpc", target), proc.pid)
                summary["spec"]["unpinned"] = True
                out["runs"][key] = summary
            except Exception as exc:
                out["runs"][key] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"  {key} failed: {exc}")
            finally:
                if proc is not None:
                    self.group.stop(proc)

    def fallback(self) -> None:
        """c=1 unary through gateways whose first provider refuses connections (see FALLBACK_CONFIGS)."""
        out: dict[str, Any] = {}
        self.results["fallback"] = out
        log("fallback")
        for fc in FALLBACK_CONFIGS:
            started: list[Any] = []
            entry: dict[str, Any] = {"title": fc.title}
            out[fc.key] = entry
            try:
                env: dict[str, str] = {}
                if fc.layout == "plain":
                    pass
                elif fc.layout == "modal_dead":
                    closed = free_port()  # nothing listens there: connect() is refused at once
                    env = {
                        "PROVIDER_ORDER": "modal,vastai",
                        "MODAL_WEB_URL": f"http://127.0.0.1:{closed}",
                    }
                else:
                    doomed_port = free_port()
                    doomed = self.group.start(
                        f"{fc.key}_doomed_upstream",
                        [sys.executable, "-m", "bench.fake_upstream", "--port", str(doomed_port)],
                        env=_env(),
                        cpu=self.side_cpu,
                    )
                    started.append(doomed)
                    doomed_url = f"http://127.0.0.1:{doomed_port}"
                    wait_until(functools.partial(http_ok, doomed_url + "/health"), 20, doomed, "doomed upstream")
                    env = {
                        "PROVIDER_ORDER": "vastai,modal",
                        "VASTAI_VLLM_URL": doomed_url,
                        "MODAL_WEB_URL": self.upstream_url,
                        "MODAL_MODEL": "bench-model",
                    }
                env.update(fc.env)
                entry["env"] = env
                proc, target = self.start_gateway(fc.key, env)
                started.append(proc)
                if fc.layout == "vastai_dies":
                    self.group.stop(started[0])  # from now on vastai's port refuses connections
                entry["probe"] = _probe_attempts(target, fc.probe_timeout_s)
                log(f"  {fc.key}: {entry['probe']}")
                if fc.measure:
                    entry["summary"] = self.measure(
                        FALLBACK_SCENARIO, self.spec(FALLBACK_SCENARIO, "grpc", target), proc.pid
                    )
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
                log(f"  {fc.key} failed: {exc}")
            finally:
                for p in reversed(started):
                    self.group.stop(p)

    def litellm(self) -> None:
        """The LiteLLM proxy on the SUT core, same upstream, same HTTP client as the baseline."""
        from bench.litellm_proxy import ensure_installed, start_litellm

        status, reason = ensure_installed(LITELLM_VENV, install=not self.args.no_install)
        if status != "ok":
            self.results["litellm"] = {"status": f"skipped: {reason}"}
            log(f"LiteLLM skipped: {reason}")
            return
        try:
            proc, url = start_litellm(self.group, LITELLM_VENV, self.upstream_url, self.out, self.sut_cpu)
        except Exception as exc:
            self.results["litellm"] = {"status": f"skipped: could not start: {str(exc)[:500]}"}
            log(f"LiteLLM skipped: {exc}")
            return
        self.results["litellm"] = {"status": f"measured ({reason})", "url": url}
        try:
            self.run_target("litellm", "http", url, proc.pid)
        finally:
            self.group.stop(proc)

    def run(self) -> int:
        """The whole run; always writes what it measured, always stops what it started."""
        t0 = time.monotonic()
        try:
            only = set(self.args.only or STAGES)
            self.start_upstream()
            if only & {"direct", "litellm"}:
                self.calibrate_http_client()
            if "direct" in only:
                self.run_target("direct", "http", self.upstream_url, self.upstream_pid)
            if "floor" in only:
                self.floor()
            if "relay" in only and not self.quick:
                self.relay()
            if "gateway" in only:
                self.gateway()
            if "workers" in only:
                self.workers()
            if "fallback" in only and not self.quick:
                self.fallback()
            if self.quick or self.args.skip_litellm or "litellm" not in only:
                why = "--quick" if self.quick else ("--skip-litellm" if self.args.skip_litellm else "not in --only")
                self.results["litellm"] = {"status": f"skipped: {why}"}
            else:
                self.litellm()
        except KeyboardInterrupt:
            self.results["interrupted"] = True
            log("interrupted: stopping everything")
        finally:
            self.group.stop_all()
            self.results["meta"]["loadavg_after"] = _loadavg()
            self.results["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
            for path in write_all(self.results, self.out):
                log(f"wrote {path}")
        return 130 if self.results.get("interrupted") else 0


def _probe_attempts(target: str, timeout_s: float = 10.0) -> str:
    """One Chat call; its ``attempts`` show whether the dead provider was tried or skipped."""
    import grpc
    from inference.v1 import inference_pb2 as pb
    from inference.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        resp = pb_grpc.InferenceServiceStub(channel).Chat(
            pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content="probe")], max_tokens=4), timeout=timeout_s
        )
    parts = [
        f"{a.provider}:{a.error_reason or 'ok'} ({a.duration.ToNanoseconds() / 1e6:.2f} ms)" for a in resp.attempts
    ]
    return f"served by {resp.provider}; attempts: " + ", ".join(parts)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return rev.strip() + (" (+ uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "?"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="gateway benchmark: direct vs gateway vs LiteLLM on a fake upstream")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    p.add_argument("--quick", action="store_true", help="a few-second smoke: small scenarios, no LiteLLM")
    p.add_argument("--skip-litellm", action="store_true", help="do not run the LiteLLM comparison")
    p.add_argument("--no-install", action="store_true", help="never run bench/setup_litellm.sh")
    p.add_argument("--profile", action="store_true", help="py-spy the gateway under c=64 unary and c=64 stream")
    p.add_argument("--profile-native", action="store_true", help="also record native frames (C, gRPC core)")
    p.add_argument("--http-client", choices=["auto", "raw", "aiohttp"], default="auto")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages (default: all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.run``."""
    args = _parse(argv)
    bench = Bench(args)
    if bench.pin:
        os.sched_setaffinity(0, {1})  # this process and its load workers stay off the SUT core

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    return bench.run()


if __name__ == "__main__":
    sys.exit(main())
