"""Real export: the service process sends spans and metrics over OTLP (gRPC, and HTTP/protobuf
chosen per signal) to receivers this test runs on loopback, to several exporters at once (comma
lists), and serves a Prometheus scrape endpoint on METRICS_ADDRESS, or on METRICS_PORT next to a
``unix:`` gRPC bind."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.routing_helpers import MESSAGES, MODAL_MODEL
from tests.test_e2e_process import free_port, wait_serving
from tests.upstreams import FakeOpenAI, Ok

ROOT = Path(__file__).resolve().parent.parent


class Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """A minimal OTLP/gRPC collector that keeps what it receives."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, str]] = []
        self.metric_names: set[str] = set()
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    self.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                    for ss in rs.scope_spans:
                        self.spans.extend(ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    self.metric_names.update(m.name for m in sm.metrics)
            return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    rec = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield rec, port
    server.stop(0)


def wait_until(predicate: Any, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_otlp_and_prometheus_export(receiver: tuple[Receiver, int]) -> None:
    rec, otlp_port = receiver
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    vast.default = Ok(tokens=["x ", "y"])
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "ANTHROPIC_", "OTEL_"))}
    env.update(
        {
            "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "VASTAI_VLLM_URL": vast.base_url,
            "VASTAI_MODEL": MODAL_MODEL,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_SERVICE_NAME": "gateway-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
            "SHUTDOWN_GRACE_S": "2",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_serving(f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            stub.Chat(pb.ChatRequest(messages=MESSAGES), timeout=10)
            list(stub.ChatStream(pb.ChatStreamRequest(messages=MESSAGES), timeout=10))

        names = lambda: {s.name for s in rec.spans}  # noqa: E731
        assert wait_until(
            lambda: {"inference.v1.InferenceService/Chat", "route ChatStream", f"chat {MODAL_MODEL}"} <= names()
        ), names()
        assert any(r.get("service.name") == "gateway-under-test" for r in rec.resources)
        assert wait_until(
            lambda: (
                {"gen_ai.client.operation.duration", "gen_ai.client.token.usage", "gateway.overhead.duration"}
                <= rec.metric_names
            )
        ), rec.metric_names

        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        duration = next(f for n, f in families.items() if n.startswith("gen_ai_client_operation_duration"))
        labels = [s.labels for s in duration.samples]
        assert any(lbl.get("gateway_provider") == "vastai" for lbl in labels)
        tokens = next(f for n, f in families.items() if n.startswith("gen_ai_client_token_usage"))
        assert {s.labels.get("gen_ai_token_type") for s in tokens.samples} >= {"input", "output"}
        assert any(n.startswith("gateway_overhead_duration") for n in families)
        assert any(n.startswith("gateway_rpc_calls") for n in families)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        vast.stop()


class HttpReceiver(BaseHTTPRequestHandler):
    """OTLP/HTTP: POST /v1/traces with an ExportTraceServiceRequest body (protobuf, maybe gzip)."""

    spans: list[Any] = []
    headers_seen: list[dict[str, str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf":
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            HttpReceiver.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    HttpReceiver.spans.extend(ss.spans)
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        else:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_http_protobuf_per_signal_comma_lists_and_a_unix_bind(receiver: tuple[Receiver, int], tmp_path: Path) -> None:
    """Traces over OTLP/HTTP (and to the console), metrics over OTLP/gRPC, Prometheus on METRICS_PORT
    while gRPC listens on a unix socket (that combination used to crash at startup)."""
    rec, grpc_port = receiver
    http = ThreadingHTTPServer(("127.0.0.1", 0), HttpReceiver)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    vast.default = Ok(tokens=["x ", "y"])
    socket_path = tmp_path / "gateway.sock"
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "ANTHROPIC_", "OTEL_"))}
    env.update(
        {
            "GRPC_LISTEN_ADDRESS": f"unix:{socket_path}",
            "VASTAI_VLLM_URL": vast.base_url,
            "VASTAI_MODEL": MODAL_MODEL,
            "OTEL_TRACES_EXPORTER": "otlp, console",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{http.server_port}",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-collector-key=ck-SECRET-0015",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{grpc_port}",
            "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "METRICS_PORT": str(metrics_port),
            "SHUTDOWN_GRACE_S": "2",
        }
    )
    rec.metric_names.clear()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        try:
            wait_serving(f"unix:{socket_path}", timeout_s=20)
        except TimeoutError:
            proc.kill()
            raise AssertionError((proc.stdout.read() if proc.stdout else b"").decode()[-3000:]) from None
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            pb_grpc.InferenceServiceStub(channel).Chat(pb.ChatRequest(messages=MESSAGES), timeout=10)
        assert wait_until(lambda: "inference.v1.InferenceService/Chat" in {s.name for s in HttpReceiver.spans})
        assert HttpReceiver.headers_seen[-1].get("x-collector-key") == "ck-SECRET-0015"
        assert wait_until(lambda: "gateway.overhead.duration" in rec.metric_names), rec.metric_names
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "gateway_rpc_calls" in body
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        vast.stop()
        http.shutdown()
    text = out.decode()
    assert '"name": "inference.v1.InferenceService/Chat"' in text, "the console exporter ran as well"
    assert "traces:otlp/http/protobuf" in text and "metrics:otlp/grpc" in text
    assert "ck-SECRET-0015" not in text
