"""Real export: the service process sends spans and metrics over OTLP/gRPC to a receiver this test
runs on loopback, and serves a Prometheus scrape endpoint on METRICS_PORT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
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
            "METRICS_PORT": str(metrics_port),
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
