"""Status of the Modal endpoint, against real HTTP stand-ins for vLLM on 127.0.0.1.

The stand-in answers ``/health`` and ``/v1/models`` the way vLLM does, with knobs for the states
a Modal deployment goes through: not listening, 503 while the engine starts, 401 from the
proxy, slow answers from a cold start, and a different served model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from modal_vllm.__main__ import main as modal_main
from modal_vllm.sdk import FunctionStats, ModalApiError, read_stats
from modal_vllm.status import (
    EndpointLookupError,
    probe_endpoint,
    proxy_auth_headers,
    resolve_endpoint,
    resolve_endpoint_async,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "Qwen/Qwen2.5-7B-Instruct"
SECRET = "ms-very-secret-value-42"


@dataclass
class Behaviour:
    """What the stand-in answers; tests change it while the server runs."""

    health_status: int = 200
    health_delay_s: float = 0.0
    models: list[str] = field(default_factory=lambda: [MODEL])
    required_headers: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


class StandIn:
    """A vLLM-shaped HTTP server in a thread."""

    def __init__(self, port: int = 0) -> None:
        self.behaviour = Behaviour()
        behaviour = self.behaviour

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                behaviour.requests.append(self.path)
                for name, value in behaviour.required_headers.items():
                    if self.headers.get(name) != value:
                        return self._send(401, {"error": "modal-http: missing credentials"})
                if self.path == "/health":
                    time.sleep(behaviour.health_delay_s)
                    return self._send(behaviour.health_status, None)
                if self.path == "/v1/models":
                    data = [{"id": m, "object": "model", "max_model_len": 4096} for m in behaviour.models]
                    return self._send(200, {"object": "list", "data": data})
                return self._send(404, {"error": "not found"})

            def _send(self, code: int, body: object) -> None:
                payload = b"" if body is None else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_healthy_endpoint_is_warm_and_matches(stand_in: StandIn) -> None:
    status = await probe_endpoint(stand_in.url + "/", MODEL)

    assert status.healthy and status.model_matches and status.ok
    assert status.state == "warm" and not status.woke_it
    assert status.served_models == [MODEL]
    assert status.http_status == 200
    assert status.error == ""
    assert status.url == stand_in.url
    assert 0 < status.probe_latency_s < 5


async def test_refused_then_503_then_healthy() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"

    # Modal's proxy accepts connections even at zero containers: refused means a wrong URL.
    refused = await probe_endpoint(url, MODEL, timeout_s=2)
    assert not refused.healthy and refused.http_status is None
    assert refused.state == "unknown"
    assert "cannot connect" in refused.error and "check MODAL_WEB_URL" in refused.error
    assert "cold" not in refused.error.replace("not how a cold Modal app behaves", "")

    server = StandIn(port)
    try:
        server.behaviour.health_status = 503
        starting = await probe_endpoint(url, MODEL, timeout_s=2)
        assert not starting.healthy and starting.http_status == 503
        assert "starting or has died" in starting.error
        assert server.behaviour.requests == ["/health"]  # no model list from a dead engine

        server.behaviour.health_status = 200
        ready = await probe_endpoint(url, MODEL, timeout_s=2)
        assert ready.ok and ready.state == "warm"
    finally:
        server.stop()


async def test_slow_health_is_not_called_cold(stand_in: StandIn) -> None:
    stand_in.behaviour.health_delay_s = 0.5

    timed_out = await probe_endpoint(stand_in.url, MODEL, timeout_s=0.1)
    assert not timed_out.healthy and timed_out.state == "unknown"  # no container count: not "cold"
    assert "may be starting" in timed_out.error

    # Answered, but slowly enough that Modal must have booted a container for it.
    slow = await probe_endpoint(stand_in.url, MODEL, timeout_s=2, warm_latency_s=0.2)
    assert slow.healthy and slow.woke_it and slow.ok and slow.state == "warm"
    assert "this probe probably started a container" in slow.message


async def test_model_mismatch_names_modal_model_and_served_ids(stand_in: StandIn) -> None:
    stand_in.behaviour.models = ["meta-llama/Llama-3.1-8B-Instruct", "other"]

    status = await probe_endpoint(stand_in.url, MODEL)

    assert status.healthy and not status.model_matches and not status.ok
    assert status.message == (
        f"MODAL_MODEL='{MODEL}' is not served by {stand_in.url}; the endpoint serves: "
        "['meta-llama/Llama-3.1-8B-Instruct', 'other']. Set MODAL_MODEL to one of them or "
        f"redeploy with MODAL_MODEL={MODEL}."
    )


async def test_401_says_proxy_auth_is_on_and_which_variables_to_set(stand_in: StandIn) -> None:
    stand_in.behaviour.required_headers = {"Modal-Key": "wk-id", "Modal-Secret": SECRET}

    missing = await probe_endpoint(stand_in.url, MODEL)
    assert not missing.healthy and missing.http_status == 401
    assert "proxy auth" in missing.message
    assert "MODAL_PROXY_TOKEN_ID/MODAL_PROXY_TOKEN_SECRET are not set" in missing.message

    env = {"MODAL_PROXY_TOKEN_ID": "wk-id", "MODAL_PROXY_TOKEN_SECRET": SECRET}
    authed = await probe_endpoint(stand_in.url, MODEL, headers=proxy_auth_headers(env))
    assert authed.ok


async def test_secret_header_values_never_appear_in_status(stand_in: StandIn) -> None:
    stand_in.behaviour.required_headers = {"Modal-Secret": "something-else"}
    headers = proxy_auth_headers(
        {
            "MODAL_PROXY_TOKEN_ID": "wk-id",
            "MODAL_PROXY_TOKEN_SECRET": SECRET,
            "VLLM_API_KEY": SECRET,
        }
    )

    status = await probe_endpoint(stand_in.url, MODEL, headers=headers)

    assert "were sent but rejected" in status.error
    for text in (repr(status), status.message, json.dumps(status.to_dict())):
        assert SECRET not in text


def test_proxy_auth_headers() -> None:
    assert proxy_auth_headers({}) == {}
    # Half a proxy token is useless to Modal, so it is not sent.
    assert proxy_auth_headers({"MODAL_PROXY_TOKEN_ID": "wk-1"}) == {}
    assert proxy_auth_headers(
        {
            "MODAL_PROXY_TOKEN_ID": "wk-1",
            "MODAL_PROXY_TOKEN_SECRET": "ws-2",
            "MODAL_VLLM_API_KEY": "k",
        }
    ) == {"Modal-Key": "wk-1", "Modal-Secret": "ws-2", "Authorization": "Bearer k"}


def test_resolve_from_web_url_strips_trailing_slash_and_skips_lookup() -> None:
    def lookup(app: str, function: str, env: Mapping[str, str]) -> str:
        raise AssertionError("MODAL_WEB_URL must win over an SDK lookup")

    env = {
        "MODAL_WEB_URL": "https://ws--multi-agent-vllm-inference-serve.modal.run/",
        "MODAL_TOKEN_ID": "ak-1",
        "MODAL_TOKEN_SECRET": "as-2",
    }
    endpoint = resolve_endpoint(env, lookup=lookup)

    assert endpoint is not None
    assert endpoint.url == "https://ws--multi-agent-vllm-inference-serve.modal.run"
    assert endpoint.source == "MODAL_WEB_URL"


def test_resolve_with_tokens_looks_up_the_deployed_function() -> None:
    calls: list[tuple[str, str, str]] = []

    def lookup(app: str, function: str, env: Mapping[str, str]) -> str:
        calls.append((app, function, env["MODAL_TOKEN_ID"]))
        return "https://ws--multi-agent-vllm-inference-serve.modal.run/"

    endpoint = resolve_endpoint({"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": "as-2"}, lookup=lookup)

    assert calls == [("multi-agent-vllm-inference", "serve", "ak-1")]
    assert endpoint is not None and endpoint.source == "modal-sdk"
    assert endpoint.url == "https://ws--multi-agent-vllm-inference-serve.modal.run"


def test_resolve_with_nothing_configured_is_none() -> None:
    assert resolve_endpoint({}) is None


def test_resolve_rejects_a_url_without_scheme() -> None:
    with pytest.raises(ValueError, match="MODAL_WEB_URL must start with https://"):
        resolve_endpoint({"MODAL_WEB_URL": "ws--app-serve.modal.run"})


def test_lookup_failure_names_app_and_variables_without_the_secret() -> None:
    def lookup(app: str, function: str, env: Mapping[str, str]) -> str:
        raise RuntimeError(f"token {env['MODAL_TOKEN_SECRET']} rejected")

    with pytest.raises(EndpointLookupError) as excinfo:
        resolve_endpoint({"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": SECRET}, lookup=lookup)

    message = str(excinfo.value)
    assert "'multi-agent-vllm-inference'" in message
    assert "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET" in message and "MODAL_WEB_URL" in message
    assert SECRET not in message


def test_lookup_that_hangs_times_out() -> None:
    def lookup(app: str, function: str, env: Mapping[str, str]) -> str:
        time.sleep(5)  # like the SDK retrying an unreachable Modal
        return "https://late.modal.run"

    started = time.monotonic()
    with pytest.raises(EndpointLookupError, match=r"no answer from Modal within 0\.2 s"):
        resolve_endpoint({"MODAL_TOKEN_ID": "a", "MODAL_TOKEN_SECRET": "b"}, lookup=lookup, lookup_timeout_s=0.2)
    assert time.monotonic() - started < 2


def test_half_configured_tokens_are_an_error_not_silence() -> None:
    with pytest.raises(EndpointLookupError, match="MODAL_TOKEN_SECRET is not set"):
        resolve_endpoint({"MODAL_TOKEN_ID": "ak-1"})


async def test_resolve_async_runs_lookup_off_the_loop_and_times_out() -> None:
    endpoint = await resolve_endpoint_async(
        {"MODAL_TOKEN_ID": "a", "MODAL_TOKEN_SECRET": "b"},
        lookup=lambda app, function, env: "https://ws--x-serve.modal.run",
    )
    assert endpoint is not None and endpoint.url == "https://ws--x-serve.modal.run"

    def hang(app: str, function: str, env: Mapping[str, str]) -> str:
        time.sleep(5)
        return "never"

    with pytest.raises(EndpointLookupError, match=r"within 0\.2 s"):
        await resolve_endpoint_async(
            {"MODAL_TOKEN_ID": "a", "MODAL_TOKEN_SECRET": "b"}, lookup=hang, lookup_timeout_s=0.2
        )


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "VLLM_"))}
    clean.update(env, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "modal_vllm", *args],
        cwd=REPO_ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_status_json_against_stand_in(stand_in: StandIn) -> None:
    stand_in.behaviour.required_headers = {"Modal-Secret": SECRET}

    result = _cli(
        "status", "--json",
        MODAL_WEB_URL=stand_in.url, MODAL_PROXY_TOKEN_ID="wk-id", MODAL_PROXY_TOKEN_SECRET=SECRET,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["served_models"] == [MODEL]
    assert report["healthy"] is True and report["model_matches"] is True
    assert report["source"] == "MODAL_WEB_URL"
    assert SECRET not in result.stdout + result.stderr


def test_cli_status_mismatch_exits_1_with_the_message(stand_in: StandIn) -> None:
    result = _cli("status", MODAL_WEB_URL=stand_in.url, MODAL_MODEL="some/other-model")

    assert result.returncode == 1
    assert "MODAL_MODEL='some/other-model' is not served by" in result.stdout


def test_cli_status_not_configured_exits_2() -> None:
    result = _cli("status")

    assert result.returncode == 2
    assert "set MODAL_WEB_URL" in result.stderr and "MODAL_TOKEN_ID" in result.stderr
    assert "modal deploy modal_vllm/deployment.py" in result.stderr


def test_cli_cost_prints_budget_table() -> None:
    result = _cli("cost", "--budget", "30")

    assert result.returncode == 0
    assert "| L4 | 0.80 | 37.5 |" in result.stdout


# --- status with Modal's container count (in-process, Modal's API replaced by a fake) --------


def _stats(containers: int, calls: list[str] | None = None) -> Callable[[str, str, Mapping[str, str]], FunctionStats]:
    def source(app: str, function: str, env: Mapping[str, str]) -> FunctionStats:
        if calls is not None:
            calls.append(env["MODAL_TOKEN_ID"])
        return FunctionStats(running_containers=containers, backlog=0)

    return source


TOKEN_ENV = {"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": SECRET}


def test_status_at_zero_containers_is_cold_and_sends_nothing(
    stand_in: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    code = modal_main(["status"], {"MODAL_WEB_URL": stand_in.url, **TOKEN_ENV}, stats_source=_stats(0, calls))

    out = capsys.readouterr().out
    assert code == 3 and calls == ["ak-1"]
    assert stand_in.behaviour.requests == []
    assert "state: cold" in out and "Modal reports 0 running containers" in out and "--wake" in out


def test_status_json_cold(stand_in: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    code = modal_main(["status", "--json"], {"MODAL_WEB_URL": stand_in.url, **TOKEN_ENV}, stats_source=_stats(0))

    report = json.loads(capsys.readouterr().out)
    assert code == 3 and report["state"] == "cold" and report["containers"] == 0 and report["probed"] is False
    assert stand_in.behaviour.requests == []


def test_status_wake_probes_despite_zero_containers(stand_in: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"MODAL_WEB_URL": stand_in.url, **TOKEN_ENV}
    code = modal_main(["status", "--wake"], env, stats_source=_stats(0))

    assert code == 0 and stand_in.behaviour.requests == ["/health", "/v1/models"]
    assert "warning" not in capsys.readouterr().err


def test_status_with_a_running_container_probes_without_warning(
    stand_in: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    code = modal_main(["status"], {"MODAL_WEB_URL": stand_in.url, **TOKEN_ENV}, stats_source=_stats(1))

    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    assert "state: warm" in captured.out and "containers: 1" in captured.out
    assert stand_in.behaviour.requests == ["/health", "/v1/models"]


def test_status_without_tokens_warns_before_the_probe(stand_in: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    def source(app: str, function: str, env: Mapping[str, str]) -> FunctionStats:
        raise AssertionError("no token: Modal's API must not be asked")

    code = modal_main(["status"], {"MODAL_WEB_URL": stand_in.url}, stats_source=source)

    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.startswith("warning: no Modal API token")
    assert "starts a GPU container" in captured.err and "MODAL_TOKEN_ID" in captured.err
    assert "containers: unknown" in captured.out


def test_status_with_unreadable_stats_warns_and_names_no_secret(
    stand_in: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    def source(app: str, function: str, env: Mapping[str, str]) -> FunctionStats:
        raise PermissionError(f"token {env['MODAL_TOKEN_SECRET']} refused")

    code = modal_main(["status"], {"MODAL_WEB_URL": stand_in.url, **TOKEN_ENV}, stats_source=source)

    captured = capsys.readouterr()
    assert code == 0 and "could not read the container count" in captured.err
    assert SECRET not in captured.err + captured.out


def test_status_refused_connection_is_a_wrong_url_not_cold(capsys: pytest.CaptureFixture[str]) -> None:
    code = modal_main(["status", "--timeout", "2"], {"MODAL_WEB_URL": f"http://127.0.0.1:{_free_port()}"})

    out = capsys.readouterr().out
    assert code == 1 and "state: unknown" in out and "check MODAL_WEB_URL" in out
    assert "state: cold" not in out


def test_read_stats_needs_tokens_and_times_out() -> None:
    with pytest.raises(ModalApiError, match="MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are not set"):
        read_stats({})

    def hang(app: str, function: str, env: Mapping[str, str]) -> FunctionStats:
        time.sleep(5)
        return FunctionStats(1, 0)

    with pytest.raises(ModalApiError, match=r"within 0\.2 s"):
        read_stats(TOKEN_ENV, source=hang, timeout_s=0.2)
    assert read_stats(TOKEN_ENV, source=_stats(2)) == FunctionStats(running_containers=2, backlog=0)
