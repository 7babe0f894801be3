"""The service as operators run it: ``python -m service`` in its own process, poked with grpcurl
and the CLI exactly as the README shows, then stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
CHAT = '{"messages":[{"role":"ROLE_USER","content":"Say hello"}],"max_tokens":8}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(f"service at {target} did not become SERVING")


def start_service(env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "VASTAI_", "ANTHROPIC_", "PROVIDER_ORDER"))
    }
    env.update({"GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}", "SHUTDOWN_GRACE_S": "5", **env_extra})
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    proc, target = start_service({})
    try:
        wait_serving(target)
        yield target
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=60)


def test_grpcurl_list_and_describe(service: str) -> None:
    listed = grpcurl("-plaintext", service, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"inference.v1.InferenceService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl("-plaintext", service, "describe", "inference.v1.InferenceService")
    assert described.returncode == 0 and "rpc ChatStream" in described.stdout
    message = grpcurl("-plaintext", service, "describe", "inference.v1.ChatRequest")
    assert "optional float temperature" in message.stdout


def test_grpcurl_chat_and_stream(service: str) -> None:
    chat = grpcurl("-plaintext", "-d", CHAT, service, "inference.v1.InferenceService/Chat")
    assert chat.returncode == 0, chat.stderr
    body = json.loads(chat.stdout)
    assert (
        body["message"]["content"]
        and body["provider"] == "local"
        and int(
            body["usage"]["completionTokens"]
            if "completionTokens" in body["usage"]
            else body["usage"]["completion_tokens"]
        )
        > 0
    )
    stream = grpcurl("-plaintext", "-d", CHAT, service, "inference.v1.InferenceService/ChatStream")
    assert stream.returncode == 0, stream.stderr
    assert stream.stdout.count('"delta"') >= 2 and stream.stdout.count('"final"') == 1


def test_grpcurl_health(service: str) -> None:
    check = grpcurl("-plaintext", service, "grpc.health.v1.Health/Check")
    assert check.returncode == 0 and json.loads(check.stdout) == {"status": "SERVING"}
    health = grpcurl("-plaintext", service, "inference.v1.InferenceService/Health")
    assert json.loads(health.stdout)["providers"][0]["name"] == "local"


def test_grpcurl_bad_input_is_invalid_argument(service: str) -> None:
    bad = grpcurl(
        "-plaintext",
        "-d",
        '{"messages":[{"role":"ROLE_USER","content":"x"}],"temperature":7}',
        service,
        "inference.v1.InferenceService/Chat",
    )
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "temperature" in bad.stderr


def test_cli_chat_stream_and_health(service: str) -> None:
    env = {**os.environ, "INFERENCE_TARGET": service}
    run = subprocess.run(
        [sys.executable, "-m", "clients", "chat", "Say hello", "--stream", "--max-tokens", "8"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "local SmolLM2-135M-Instruct" in run.stderr
    health = subprocess.run(
        [sys.executable, "-m", "clients", "health"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "SERVING"
    bad = subprocess.run(
        [sys.executable, "-m", "clients", "chat", "x", "--max-tokens", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "max_tokens" in bad.stderr


def test_sigterm_drains_and_exits_zero() -> None:
    # A grace far above what the answer needs even on a loaded 2-core machine (the embedded model
    # shares the cores with the test run): this checks the drain, not the model's speed.
    proc, target = start_service({"SHUTDOWN_GRACE_S": "60"})
    try:
        wait_serving(target)
        with grpc.insecure_channel(target) as channel:
            from inference.v1 import inference_pb2 as pb
            from inference.v1 import inference_pb2_grpc as pb_grpc

            stub = pb_grpc.InferenceServiceStub(channel)
            # A stream in flight when SIGTERM arrives finishes within the grace period.
            call = stub.ChatStream(
                pb.ChatStreamRequest(messages=[pb.Message(role=pb.ROLE_USER, content="Tell a story")], max_tokens=24),
                timeout=90,
            )
            first = next(call)
            assert first.HasField("delta")
            proc.send_signal(signal.SIGTERM)
            rest = list(call)
            assert rest[-1].HasField("final")
        assert proc.wait(timeout=90) == 0
        log = proc.stdout.read().decode() if proc.stdout else ""
        assert "shutting down" in log and "stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_config_exits_2_with_the_variable_named() -> None:
    proc, _ = start_service({"MAX_CONCURRENT_REQUESTS": "many"})
    assert proc.wait(timeout=30) == 2
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert "MAX_CONCURRENT_REQUESTS='many': Input should be a valid integer" in out


def readme_grpcurl_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [line for line in text.splitlines() if line.startswith(".venv/bin/grpcurl ")]


def test_readme_grpcurl_examples_work_as_printed(service: str) -> None:
    import shlex

    lines = readme_grpcurl_lines()
    assert len(lines) >= 7
    for line in lines:
        argv = [
            GRPCURL if a == ".venv/bin/grpcurl" else a.replace("127.0.0.1:50051", service) for a in shlex.split(line)
        ]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if '"content":""' in line:
            assert run.returncode != 0 and "InvalidArgument" in run.stderr and "messages[0].content" in run.stderr
        else:
            assert run.returncode == 0, (line, run.stderr)
            assert run.stdout.strip()


def test_every_setting_is_documented() -> None:

    from service.config import ENV_DOCS, Settings

    documented = " ".join(v for v, _, _ in ENV_DOCS)
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert name.upper() in documented, f"{name.upper()} missing from ENV_DOCS"
    for var, _default, _ in ENV_DOCS:
        assert f"`{var}`" in readme, f"{var} missing from the README's configuration table"
