"""``python -m clients`` against a real gRPC server: options anywhere, environment defaults, NDJSON
streams, clear errors, Ctrl-C, --version and an example in every help."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from inference.v1 import inference_pb2 as pb

from clients.cli import main
from tests.client_helpers import Failure, ScriptedServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as running:
        yield running


def run(argv: list[str], capsys: pytest.CaptureFixture[str], **env: str) -> tuple[int, str, str]:
    code = main(argv, env=env)
    out, err = capsys.readouterr()
    return code, out, err


def cli(*args: str, **env: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "clients", *args],
        cwd=ROOT,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("where", ["after", "before"])
def test_connection_options_go_anywhere(server: ScriptedServer, capsys: pytest.CaptureFixture[str], where: str) -> None:
    options = ["--target", server.target, "--api-key", "k1", "--timeout", "5"]
    argv = ["chat", "hi", *options] if where == "after" else [*options, "chat", "hi"]

    code, out, err = run(argv, capsys)

    assert code == 0, err
    assert out == "whole\n" and err.startswith("[p m finish=stop tokens=3+1]")
    assert server.servicer.calls()[0].metadata["authorization"] == "Bearer k1"


def test_environment_defaults_and_flags_override_them(
    server: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["health"], capsys, INFERENCE_TARGET=server.target, INFERENCE_API_KEY="from-env")
    assert code == 0, err
    code, _, err = run(["health", "--api-key", "from-flag"], capsys, INFERENCE_TARGET=server.target)
    assert code == 0, err
    code, _, err = run(["--target", server.target, "health"], capsys, INFERENCE_TARGET="127.0.0.1:1")
    assert code == 0, err

    keys = [r.metadata.get("authorization") for r in server.servicer.calls("Health")]
    assert keys == ["Bearer from-env", "Bearer from-flag", None]


def test_chat_flags_reach_the_request(
    server: ScriptedServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    argv = [
        "chat", "-", "--system", "terse", "--model", "m1", "--max-tokens", "9", "--temperature", "0.3",
        "--top-p", "0.8", "--stop", "A", "--stop", "B", "--seed", "7", "--cold-start", "fallback", "--stream",
    ]  # fmt: skip
    code, out, err = run(argv, capsys, INFERENCE_TARGET=server.target)

    assert code == 0, err
    assert out == "whole\n"
    request = server.servicer.calls("ChatStream")[0].request
    assert [(m.role, m.content) for m in request.messages] == [(pb.ROLE_SYSTEM, "terse"), (pb.ROLE_USER, "from stdin")]
    assert (request.model, request.max_tokens, request.seed, list(request.stop)) == ("m1", 9, 7, ["A", "B"])
    assert request.temperature == pytest.approx(0.3) and request.top_p == pytest.approx(0.8)
    assert request.cold_start_policy == pb.COLD_START_POLICY_FALLBACK


def test_json_stream_is_ndjson_one_object_per_message(
    server: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.servicer.deltas = ["a", "b", "c"]
    code, out, err = run(["chat", "hi", "--stream", "--json", "--target", server.target], capsys)

    assert code == 0 and err == ""
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[:3] == [{"delta": {"text": "a"}}, {"delta": {"text": "b"}}, {"delta": {"text": "c"}}]
    assert len(lines) == 4 and lines[3]["final"]["text"] == "abc" and lines[3]["final"]["finish_reason"] == "stop"


def test_errors_name_the_failure_and_exit_1(server: ScriptedServer, capsys: pytest.CaptureFixture[str]) -> None:
    bad = Failure("INVALID_ARGUMENT", "max_tokens must be positive")
    server.servicer.failures.append(bad)
    code, out, err = run(["chat", "x", "--target", server.target], capsys)
    assert code == 1 and out == "" and err.startswith("error: INVALID_ARGUMENT: max_tokens must be positive")

    server.servicer.failures.append(bad)
    code, out, err = run(["chat", "x", "--stream", "--json", "--target", server.target], capsys)
    assert code == 1 and err == ""
    assert json.loads(out) == {
        "error": {"code": "INVALID_ARGUMENT", "message": "max_tokens must be positive", "reason": "", "metadata": {}}
    }


def test_retry_flags(server: ScriptedServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.servicer.failures.extend([Failure("UNAVAILABLE")] * 3)
    code, _, _ = run(["chat", "x", "--retries", "1", "--retry-delay", "0.01", "--target", server.target], capsys)
    assert code == 1 and len(server.servicer.calls()) == 2

    server.servicer.failures.clear()
    server.servicer.failures.append(Failure("RESOURCE_EXHAUSTED", retry_after_s=0.05))
    code, out, _ = run(["chat", "x", "--retry-rate-limited", "--target", server.target], capsys)
    assert code == 0 and out == "whole\n"


def test_missing_ca_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing-ca.pem"
    code, out, err = run(["chat", "hi", "--ca", str(missing)], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"error: cannot read the CA file '{missing}' (from --ca / ca_file): No such file or directory"
    ]

    code, _, err = run(["health"], capsys, INFERENCE_CA_FILE=str(missing))
    assert code == 2 and len(err.splitlines()) == 1 and "INFERENCE_CA_FILE" in err


@pytest.mark.parametrize("command", ["chat", "models", "health", "providers", "usage"])
def test_every_subcommand_help_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "examples:" in out and f"python -m clients {command}" in out.split("examples:")[1]
    assert "--target" in out  # the connection options are listed on every subcommand too


def test_version() -> None:
    proc = cli("--version")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.startswith("python -m clients ") and out.strip().split()[-1][0].isdigit()


def test_ctrl_c_ends_cleanly_with_130_and_cancels_the_call(server: ScriptedServer) -> None:
    server.servicer.deltas = ["first ", "never"]
    server.servicer.delay_between_s = 30
    proc = cli("chat", "hi", "--stream", "--target", server.target)
    try:
        assert server.servicer.first_delta_sent.wait(20), "the stream never started"
        assert proc.stdout is not None and proc.stdout.read(6) == "first "
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert server.servicer.cancelled.wait(10), "the server never saw the call cancelled"
