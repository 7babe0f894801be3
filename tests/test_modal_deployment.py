"""The Modal deployment: settings from env, the vllm argv and environment, offline import,
failing fast when vLLM dies during startup, and pricing.

Importing ``modal_vllm/deployment.py`` happens in subprocesses, because it reads settings from
the environment at import and registers a Modal app; a socket guard there fails any network
connect or DNS lookup, which proves that defining the app needs no Modal account or network.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from modal_vllm.launch import VllmExitedError, wait_until_listening
from modal_vllm.pricing import (
    budget_table,
    cost_for_bursts_usd,
    cost_usd,
    format_budget_table,
    hours_for_budget,
    parse_price_overrides,
)
from modal_vllm.settings import (
    APP_NAME,
    DEFAULT_MODEL_REVISION,
    DeploymentSettings,
    vllm_serve_command,
    vllm_serve_environment,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_ARGV = [
    "vllm", "serve", "Qwen/Qwen2.5-7B-Instruct",
    "--revision", "a09a35458c702b33eeacc393d103063234e8bc28",
    "--served-model-name", "Qwen/Qwen2.5-7B-Instruct",
    "--host", "0.0.0.0",
    "--port", "8000",
    "--max-model-len", "4096",
    "--max-num-seqs", "32",
    "--uvicorn-log-level=info",
    "--enforce-eager",
    "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
]  # fmt: skip

# Runs in a fresh interpreter: blocks the network, imports the deployment, calls the `serve`
# body locally with Popen replaced, and reports what it saw as JSON on stdout.
IMPORT_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys

    def refuse(*args, **kwargs):
        raise RuntimeError(f"network access attempted: {args!r}")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.getaddrinfo = refuse

    import modal
    import modal_vllm.deployment as deployment

    popen_calls, waits = [], []

    class FakePopen:
        def __init__(self, argv, **kwargs):
            env = kwargs.get("env") or {}
            popen_calls.append({
                "argv": argv,
                "kwargs": sorted(kwargs),
                "env_api_key": env.get("VLLM_API_KEY"),
                "env_hf_token": env.get("HF_TOKEN"),
            })

    def fake_wait(process, port, **kwargs):
        waits.append({"port": port, "timeout_s": kwargs["timeout_s"], "process": type(process).__name__})
        return 0.0

    deployment.subprocess.Popen = FakePopen
    deployment.wait_until_listening = fake_wait
    deployment.serve.local()
    print(json.dumps({
        "app_name": deployment.app.name,
        "serve_is_function": isinstance(deployment.serve, modal.Function),
        "gpu": deployment.settings.gpu,
        "fast_boot": deployment.FAST_BOOT,
        "scaledown_window_s": deployment.settings.scaledown_window_s,
        "container_env": deployment.settings.to_env(),
        "secret_count": len(deployment.secrets),
        "volume_paths": sorted(deployment.volumes),
        "popen_calls": popen_calls,
        "waits": waits,
    }))
    """
)


def _clean_env(**overrides: str) -> dict[str, str]:
    # No Modal tokens or deployment settings leak in from the developer's shell.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MODAL_", "VLLM_")) and key != "MAX_CONCURRENT_REQUESTS"
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    # Keeps modal from reading a real ~/.modal.toml on a developer machine.
    env["MODAL_CONFIG_PATH"] = str(REPO_ROOT / "tests" / "no-such-modal.toml")
    env.update(overrides)
    return env


def _import_deployment(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT],
        cwd=REPO_ROOT,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_import_defines_app_offline_and_serve_starts_vllm_without_shell() -> None:
    result = _import_deployment(VLLM_API_KEY="container-key", HF_TOKEN="hf-token")

    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["app_name"] == APP_NAME == "multi-agent-vllm-inference"
    assert seen["serve_is_function"] is True
    assert seen["gpu"] == "L4"
    assert seen["fast_boot"] is True
    assert seen["scaledown_window_s"] == 300
    assert seen["secret_count"] == 0
    assert seen["volume_paths"] == ["/root/.cache/huggingface", "/root/.cache/vllm"]
    # The keys reach vLLM through its environment, never its command line; no shell is involved.
    assert seen["popen_calls"] == [
        {"argv": DEFAULT_ARGV, "kwargs": ["env"], "env_api_key": "container-key", "env_hf_token": "hf-token"}
    ]
    assert "container-key" not in json.dumps(seen["popen_calls"][0]["argv"])
    # serve() waits for the port while watching the process, under the 20-minute startup timeout.
    assert seen["waits"] == [{"port": 8000, "timeout_s": 1200, "process": "FakePopen"}]


def test_import_with_overrides_passes_settings_to_the_container() -> None:
    result = _import_deployment(
        MODAL_MODEL="Qwen/Qwen2.5-0.5B-Instruct",
        MODAL_GPU_TYPE="a10g",
        MAX_CONCURRENT_REQUESTS="8",
        MODAL_MAX_MODEL_LEN="2048",
        MODAL_SCALEDOWN_WINDOW_MINUTES="2.5",
        MODAL_VLLM_API_KEY_SECRET="vllm-api-key",
        MODAL_HF_TOKEN_SECRET="huggingface",
        MODAL_FAST_BOOT="false",
    )

    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["gpu"] == "A10G"
    assert seen["fast_boot"] is False
    assert seen["scaledown_window_s"] == 150
    assert seen["secret_count"] == 2
    # The container re-imports the module; these variables make it build the same settings.
    assert seen["container_env"]["MODAL_MODEL"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert DeploymentSettings.from_env(seen["container_env"]).max_concurrent_requests == 8
    argv = seen["popen_calls"][0]["argv"]
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct"]
    assert "--api-key" not in argv and seen["popen_calls"][0]["env_api_key"] is None
    assert argv[argv.index("--compilation-config") + 1] == '{"cudagraph_capture_sizes":[1,2,4,8]}'
    assert DeploymentSettings.from_env(seen["container_env"]).tool_call_parser == "hermes"


def test_import_with_unsupported_gpu_fails_naming_the_accepted_types() -> None:
    result = _import_deployment(MODAL_GPU_TYPE="T4")

    assert result.returncode != 0
    assert "MODAL_GPU_TYPE='T4' is not supported; accepted: L4, A10G, A100, H100" in result.stderr


def test_serve_command_from_defaults_is_exact() -> None:
    assert vllm_serve_command(DeploymentSettings.from_env({})) == DEFAULT_ARGV


def test_serve_command_from_overridden_env_is_exact() -> None:
    settings = DeploymentSettings.from_env(
        {
            "MODAL_MODEL": "meta-llama/Llama-3.1-8B-Instruct",
            "MODAL_MODEL_REVISION": "0e9e39f249a16976918f6564b8830bc894c89659",
            "MAX_CONCURRENT_REQUESTS": "16",
            "MODAL_MAX_MODEL_LEN": "8192",
        }
    )

    # Not a Qwen2.5 model: no tool-call parser unless one is named.
    assert vllm_serve_command(settings) == [
        "vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct",
        "--revision", "0e9e39f249a16976918f6564b8830bc894c89659",
        "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct",
        "--host", "0.0.0.0",
        "--port", "8000",
        "--max-model-len", "8192",
        "--max-num-seqs", "16",
        "--uvicorn-log-level=info",
        "--enforce-eager",
    ]  # fmt: skip


def test_fast_boot_off_compiles_and_captures_only_usable_batch_sizes() -> None:
    settings = DeploymentSettings.from_env({"MODAL_FAST_BOOT": "false", "MAX_CONCURRENT_REQUESTS": "24"})

    argv = vllm_serve_command(settings)
    assert "--enforce-eager" not in argv and "--no-enforce-eager" in argv
    config = json.loads(argv[argv.index("--compilation-config") + 1])
    assert config == {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 24]}


@pytest.mark.parametrize(
    ("env", "parser"),
    [
        ({}, "hermes"),  # Qwen2.5 by default
        ({"MODAL_TOOL_CALL_PARSER": "none"}, ""),
        ({"MODAL_TOOL_CALL_PARSER": "Off"}, ""),
        ({"MODAL_MODEL": "mistralai/Mistral-7B-Instruct-v0.3"}, ""),
        ({"MODAL_MODEL": "mistralai/Mistral-7B-Instruct-v0.3", "MODAL_TOOL_CALL_PARSER": "mistral"}, "mistral"),
    ],
)
def test_tool_calling_flags_follow_the_setting(env: dict[str, str], parser: str) -> None:
    settings = DeploymentSettings.from_env(env)
    argv = vllm_serve_command(settings)

    assert settings.tool_call_parser == parser
    if parser:
        assert argv[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    else:
        assert "--enable-auto-tool-choice" not in argv and "--tool-call-parser" not in argv
    assert DeploymentSettings.from_env(settings.to_env()) == settings


def test_bad_tool_call_parser_names_the_variable() -> None:
    with pytest.raises(ValueError, match="MODAL_TOOL_CALL_PARSER must be a vLLM tool-call parser name"):
        DeploymentSettings.from_env({"MODAL_TOOL_CALL_PARSER": "hermes; rm -rf /"})


def test_environment_passes_secrets_and_drops_blank_ones() -> None:
    env = vllm_serve_environment({"PATH": "/usr/bin", "VLLM_API_KEY": "k-1", "HF_TOKEN": "  "})

    assert env == {"PATH": "/usr/bin", "VLLM_API_KEY": "k-1"}
    assert vllm_serve_environment({"PATH": "/bin"}) == {"PATH": "/bin"}


def test_vllm_exiting_during_startup_fails_at_once_with_its_code() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    try:
        started = time.monotonic()
        with pytest.raises(VllmExitedError, match="exited with code 3 during startup") as info:
            wait_until_listening(process, _free_port(), timeout_s=60, poll_interval_s=0.05)
        assert info.value.returncode == 3
        assert time.monotonic() - started < 30  # not the timeout: generous, the point is "not 60 s"
    finally:
        process.wait(5)


def test_wait_returns_once_the_port_opens_and_times_out_otherwise() -> None:
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-c",
            "import socket, time; s = socket.socket(); time.sleep(0.3); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(30)",
        ]
    )  # fmt: skip
    try:
        assert wait_until_listening(server, port, timeout_s=30, poll_interval_s=0.05) >= 0
    finally:
        server.kill()
        server.wait(5)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(TimeoutError, match=f"did not open port {port} within 0.3 s"):
            wait_until_listening(sleeper, port, timeout_s=0.3, poll_interval_s=0.05)
    finally:
        sleeper.kill()
        sleeper.wait(5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_qwen_pin_is_not_applied_to_another_model() -> None:
    # A Qwen commit hash would make another model's first download fail.
    other = DeploymentSettings.from_env({"MODAL_MODEL": "mistralai/Mistral-7B-Instruct-v0.3"})
    default = DeploymentSettings.from_env({})

    assert "--revision" not in vllm_serve_command(other)
    assert default.model_revision == DEFAULT_MODEL_REVISION


def test_defaults() -> None:
    settings = DeploymentSettings.from_env({})

    assert settings.require_proxy_auth is True
    assert settings.vllm_api_key_secret == "" and settings.hf_token_secret == ""
    assert settings.fast_boot is True and settings.tool_call_parser == "hermes"
    assert settings.scaledown_window_s == 300
    assert DeploymentSettings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize("raw", ["l4", "A10g", " h100 ", "A100"])
def test_gpu_type_is_case_insensitive(raw: str) -> None:
    assert DeploymentSettings.from_env({"MODAL_GPU_TYPE": raw}).gpu == raw.strip().upper()


def test_bad_gpu_type_lists_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"MODAL_GPU_TYPE='B200'.*accepted: L4, A10G, A100, H100"):
        DeploymentSettings.from_env({"MODAL_GPU_TYPE": "B200"})


def test_non_numeric_scaledown_window_names_variable_and_value() -> None:
    with pytest.raises(ValueError) as excinfo:
        DeploymentSettings.from_env({"MODAL_SCALEDOWN_WINDOW_MINUTES": "five"})

    assert str(excinfo.value) == "MODAL_SCALEDOWN_WINDOW_MINUTES must be a positive number, got 'five'"


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf"])
def test_scaledown_window_must_be_positive(raw: str) -> None:
    with pytest.raises(ValueError, match="MODAL_SCALEDOWN_WINDOW_MINUTES"):
        DeploymentSettings.from_env({"MODAL_SCALEDOWN_WINDOW_MINUTES": raw})


def test_scaledown_window_beyond_modal_limit_is_rejected_here() -> None:
    with pytest.raises(ValueError, match="out of range; Modal accepts 2 s to 60 minutes"):
        DeploymentSettings.from_env({"MODAL_SCALEDOWN_WINDOW_MINUTES": "90"})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("MAX_CONCURRENT_REQUESTS", "0"),
        ("MAX_CONCURRENT_REQUESTS", "4.5"),
        ("MODAL_MAX_MODEL_LEN", "x"),
    ],
)
def test_bad_integers_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got '{raw}'"):
        DeploymentSettings.from_env({name: raw})


def test_proxy_auth_opt_out_and_typo() -> None:
    assert DeploymentSettings.from_env({"MODAL_REQUIRE_PROXY_AUTH": "false"}).require_proxy_auth is False
    with pytest.raises(ValueError, match="MODAL_REQUIRE_PROXY_AUTH must be true or false"):
        DeploymentSettings.from_env({"MODAL_REQUIRE_PROXY_AUTH": "nope"})


def test_budget_hours() -> None:
    assert hours_for_budget(30, "L4") == pytest.approx(37.5)
    assert hours_for_budget(30, "h100") == pytest.approx(30 / 4.5)
    assert cost_usd("A10G", 10) == pytest.approx(11.0)


def test_burst_cost_counts_boot_and_scaledown_window() -> None:
    # 30 s boot + 60 s busy + 300 s idle = 390 s billed per burst, on an L4 at $0.80/h.
    assert cost_for_bursts_usd("L4", 100, busy_s_per_burst=60, scaledown_window_s=300) == (
        pytest.approx(100 * 390 / 3600 * 0.80)
    )


def test_unknown_gpu_price_and_negative_budget_are_errors() -> None:
    with pytest.raises(ValueError, match="priced: L4, A10G, A100, H100"):
        hours_for_budget(30, "T4")
    with pytest.raises(ValueError, match="must not be negative"):
        hours_for_budget(-1, "L4")


def test_budget_table_is_cheapest_first_and_rendered() -> None:
    rows = budget_table(30)

    assert [row.gpu for row in rows] == ["L4", "A10G", "A100", "H100"]
    assert rows[0].hours == pytest.approx(37.5)
    assert "| L4 | 0.80 | 37.5 |" in format_budget_table(30)


def test_prices_are_the_designs_figures_unless_overridden() -> None:
    prices = parse_price_overrides(["l4=1.0", "B200=6.25"])

    assert prices["L4"] == 1.0 and prices["B200"] == 6.25 and prices["H100"] == 4.5
    assert "| L4 | 1.00 | 30.0 |" in format_budget_table(30, prices)
    assert "| L4 | 0.80 | 37.5 |" in format_budget_table(30)  # the module's table is unchanged
    for bad in ("L4", "L4=", "L4=-1", "=2", "L4=nan"):
        with pytest.raises(ValueError, match="GPU=USD_PER_HOUR"):
            parse_price_overrides([bad])
