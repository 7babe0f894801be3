"""Per-tenant policy: TENANTS_FILE (resolution, errors naming line and field), model and provider
restrictions over real channels, the audit log, and reloads of changed files under a running
server (the file watcher, SIGHUP to the real process), where a broken file keeps the old policy."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from service.errors import ConfigError
from service.guard.policy import Policies, load_tenants_file
from service.guard.security import Security
from tests.conftest import make_settings, start_gateway, stop_gateway
from tests.fakes import CannedProvider, bearer
from tests.otel_memory import delta, install, snapshot
from tests.routing_helpers import MODAL_MODEL
from tests.test_e2e_process import free_port, wait_serving
from tests.upstreams import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
ALPHA = "alpha-token-0123456789abcdef"
BETA = "beta-token-0123456789abcdef"
GAMMA = "gamma-token-0123456789abcdef"
HELLO = [pb.Message(role=pb.ROLE_USER, content="hello")]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def rewrite(path: str, text: str) -> None:
    """Replaces a file's content in place (as an editor or a config tool would)."""
    Path(path).write_text(text)


async def until(predicate: Callable[[], Any], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ----------------------------------------------------------------------------- the file


CONTRACT = """
[defaults]
rpm = 60
tpm = 1000

[tenants.acme]
rpm = 600                      # requests per minute
tpm = 200000
max_concurrent = 8
models = ["qwen2.5-7b"]
providers = ["modal", "vastai"]
monthly_budget_usd = 50

[tenants."ops.batch"]
burst = 20
providers = []
"""


def test_the_contract_resolves_per_tenant(tmp_path: Path) -> None:
    settings = make_settings(tenants_file=write(tmp_path, "t.toml", CONTRACT), rate_limit_tpm=5, rate_limit_rpm=7)
    policies = Policies.from_settings(settings)
    acme = policies.for_tenant("acme")
    assert (acme.rpm, acme.burst, acme.tpm, acme.max_concurrent) == (600, 60, 200000, 8)
    assert acme.models == {"qwen2.5-7b"} and acme.providers == {"modal", "vastai"}
    assert acme.monthly_budget_usd == 50, "kept on the policy for the spend report"
    batch = policies.for_tenant("ops.batch")
    assert (batch.rpm, batch.burst, batch.tpm) == (60, 20, 1000), "unset keys come from [defaults]"
    assert batch.providers == frozenset() and batch.models is None
    for other in ("somebody", "anonymous"):
        policy = policies.for_tenant(other)
        assert (policy.rpm, policy.burst, policy.tpm, policy.max_concurrent) == (60, 6, 1000, 0)
        assert policy.models is None and policy.providers is None and policy.monthly_budget_usd is None
    no_file = Policies.from_settings(make_settings(rate_limit_rpm=7, rate_limit_tpm=5)).for_tenant("x")
    assert (no_file.rpm, no_file.burst, no_file.tpm) == (7, 1, 5), "without a file: the environment's limits"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[tenants.acme]\nrpm = -1\n", "line 2: tenants.acme.rpm = -1: Input should be greater than or equal to 0"),
        ("[tenants.acme]\nrpm = 5\nrmp = 5\n", "line 3: tenants.acme.rmp: not a known key (known: rpm, burst"),
        ('[tenants.acme]\nproviders = ["modal", "openai"]\n', "line 2: tenants.acme.providers = 'openai'"),
        ('[tenants."bad name"]\nrpm = 1\n', "line 1: tenants.bad name: tenant names are 1-64 letters"),
        ('[defaults]\ntpm = 5\nrpm = "lots"\n', "line 3: defaults.rpm = 'lots': Input should be a valid integer"),
        (
            "[tenants.acme]\nmonthly_budget_usd = nan\n",
            "line 2: tenants.acme.monthly_budget_usd = nan: must be a finite",
        ),
        ("[tenant.acme]\nrpm = 1\n", "line 1: tenant: not a known key (known: defaults, tenants)"),
        ("[tenants.acme\nrpm = 1\n", "is not valid TOML: "),
        ("[tenants.acme]\nburst = 0\n", "line 2: tenants.acme.burst = 0: Input should be greater than 0"),
    ],
)
def test_a_bad_file_is_an_error_naming_the_line_and_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "t.toml", text)
    with pytest.raises(ConfigError) as info:
        load_tenants_file(path)
    assert str(info.value).startswith(f"TENANTS_FILE={path}") and expected in str(info.value), str(info.value)
    assert "\n" not in str(info.value), "one line"
    with pytest.raises(ConfigError):
        Security(make_settings(tenants_file=path))  # and startup refuses it


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TENANTS_FILE=.*cannot be read"):
        Security(make_settings(tenants_file=str(tmp_path / "missing.toml")))


@pytest.mark.parametrize("content", ["", "# only comments\n\n   \n# more\n"])
def test_an_empty_key_file_refuses_to_start(tmp_path: Path, content: str) -> None:
    """It used to turn authentication off, with a warning saying no file was configured."""
    keys = write(tmp_path, "keys", content)
    with pytest.raises(ConfigError, match=r"INFERENCE_API_KEYS_FILE=.* holds no keys"):
        Security(make_settings(inference_api_keys_file=keys))


def test_the_service_exits_2_on_an_empty_key_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "VASTAI_", "ANTHROPIC_", "OTEL_"))}
    env |= {
        "INFERENCE_API_KEYS_FILE": write(tmp_path, "keys", "# nothing yet\n"),
        "VASTAI_VLLM_URL": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "holds no keys" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- restrictions


MODELS = """
default = "qwen"

[models.qwen]
modal = "canned-model"
vastai = "canned-model"

[models.other]
vastai = "another-model"
"""


async def test_a_model_outside_the_policy_is_permission_denied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = write(
        tmp_path,
        "t.toml",
        '[tenants.alpha]\nmodels = ["qwen"]\n[tenants.gamma]\nmodels = ["other"]\n',
    )
    settings = make_settings(
        inference_api_keys=f"alpha:{ALPHA},beta:{BETA},gamma:{GAMMA}",
        tenants_file=policy,
        models_file=write(tmp_path, "models.toml", MODELS),
    )
    running = await start_gateway(settings, [CannedProvider("modal"), CannedProvider("vastai")])
    caplog.set_level(logging.INFO, logger="service.audit")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Chat(pb.ChatRequest(messages=HELLO, model="other"), metadata=bearer(ALPHA), timeout=5)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "'alpha'" in (info.value.details() or "") and "'other'" in (info.value.details() or "")
        # A catalogue name, one of its model ids, and the default (which is that name) are allowed.
        for model in ("qwen", "canned-model", ""):
            reply = await running.stub.Chat(pb.ChatRequest(messages=HELLO, model=model), metadata=bearer(ALPHA))
            assert reply.message.content == "canned answer"
        stream = running.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO, model="other"), metadata=bearer(ALPHA))
        assert await code_of(stream.read()) is grpc.StatusCode.PERMISSION_DENIED
        # The default is not among gamma's models: it must name one.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Chat(pb.ChatRequest(messages=HELLO), metadata=bearer(GAMMA), timeout=5)
        assert "must name a model" in (info.value.details() or "")
        assert (await running.stub.Chat(pb.ChatRequest(messages=HELLO, model="other"), metadata=bearer(BETA))).message
    finally:
        await stop_gateway(running)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.audit"]
    denial = next(line for line in lines if line["event"] == "permission")
    assert denial["tenant"] == "alpha" and denial["outcome"] == "refused" and denial["reason"] == "model"
    assert denial["peer"] and denial["method"] == "inference.v1.InferenceService/Chat" and denial["time"]
    assert ALPHA not in caplog.text


async def test_providers_outside_the_policy_are_never_reached(tmp_path: Path) -> None:
    policy = write(tmp_path, "t.toml", '[tenants.alpha]\nproviders = ["vastai"]\n[tenants.gamma]\nproviders = []\n')
    modal, vast = CannedProvider("modal"), CannedProvider("vastai")
    settings = make_settings(inference_api_keys=f"alpha:{ALPHA},beta:{BETA},gamma:{GAMMA}", tenants_file=policy)
    running = await start_gateway(settings, [modal, vast])
    try:
        assert (await running.stub.Chat(pb.ChatRequest(messages=HELLO), metadata=bearer(ALPHA))).provider == "vastai"
        stream = running.stub.ChatStream(pb.ChatStreamRequest(messages=HELLO), metadata=bearer(ALPHA))
        assert [m async for m in stream][-1].final.provider == "vastai"
        assert modal.calls == 0, "the first provider in the chain was skipped for alpha"
        assert (await running.stub.Chat(pb.ChatRequest(messages=HELLO), metadata=bearer(BETA))).provider == "modal"
        call = running.stub.Chat(pb.ChatRequest(messages=HELLO), metadata=bearer(GAMMA), timeout=5)
        assert await code_of(call) is grpc.StatusCode.PERMISSION_DENIED
    finally:
        await stop_gateway(running)


# ----------------------------------------------------------------------------- reloads


async def test_changed_files_are_reloaded_under_a_running_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    installed = install()
    keys = write(tmp_path, "keys", f"alpha:{ALPHA}\n")
    policy = write(tmp_path, "t.toml", "[tenants.alpha]\nrpm = 600\n")
    settings = make_settings(inference_api_keys_file=keys, tenants_file=policy, config_reload_interval_s=0.05)
    running = await start_gateway(settings, [CannedProvider()])
    caplog.set_level(logging.INFO)
    before = snapshot(installed[1]) if installed else {}

    def chat(token: str, model: str = "") -> Any:
        return code_of(running.stub.Chat(pb.ChatRequest(messages=HELLO, model=model), metadata=bearer(token)))

    async def eventually(token: str, expected: grpc.StatusCode, model: str = "") -> None:
        deadline = time.monotonic() + 5
        while (code := await chat(token, model)) is not expected:
            assert time.monotonic() < deadline, f"still {code.name}"
            await asyncio.sleep(0.05)

    try:
        assert await chat(BETA) is grpc.StatusCode.UNAUTHENTICATED
        rewrite(keys, f"alpha:{ALPHA}\nbeta:{BETA}\n")
        await eventually(BETA, grpc.StatusCode.OK)  # a new key, without a restart

        rewrite(policy, '[tenants.alpha]\nmodels = ["approved"]\n')
        await eventually(ALPHA, grpc.StatusCode.PERMISSION_DENIED)
        assert await chat(ALPHA, "approved") is grpc.StatusCode.OK

        rewrite(policy, '[tenants.alpha]\nmodels = "approved"\nrpm = "x"\n')  # broken: kept out
        await until(lambda: any(r.levelno == logging.ERROR for r in caplog.records))
        error = next(r for r in caplog.records if r.levelno == logging.ERROR)
        assert (
            "line 2: tenants.alpha.models" in error.getMessage() and "line 3: tenants.alpha.rpm" in error.getMessage()
        )
        assert await chat(ALPHA) is grpc.StatusCode.PERMISSION_DENIED, "the previous policy stays in force"
        assert await chat(ALPHA, "approved") is grpc.StatusCode.OK

        rewrite(keys, "# everyone removed by mistake\n")  # an empty key file is refused too
        await until(lambda: "holds no keys" in caplog.text)
        assert await chat(BETA) is grpc.StatusCode.OK

        rewrite(keys, f"alpha:{ALPHA}\n")
        await eventually(BETA, grpc.StatusCode.UNAUTHENTICATED)  # a removed key stops working

        result = running.gateway.reload("SIGHUP")  # what the signal handler calls
        assert result.changed == [] and set(result.failed) == {"tenants"}
    finally:
        await stop_gateway(running)
    audits = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.audit"]
    reloads = [a for a in audits if a["event"] == "policy_reload"]
    assert {a["outcome"] for a in reloads} == {"ok", "failed"} and reloads[-1]["trigger"] == "SIGHUP"
    assert ALPHA not in caplog.text and BETA not in caplog.text
    if installed:
        failures = delta(
            before, snapshot(installed[1]), "gateway.config.reload_failures", **{"gateway.config.part": "tenants"}
        )
        assert failures.value == 2  # the broken file once, then again at SIGHUP


def test_sighup_reloads_the_real_process_and_logs_json(tmp_path: Path) -> None:
    keys = write(tmp_path, "keys", f"alpha:{ALPHA}\n")
    policy = write(tmp_path, "t.toml", "[tenants.alpha]\nrpm = 600\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "VASTAI_", "ANTHROPIC_", "OTEL_"))}
    with FakeOpenAI(models=[MODAL_MODEL]) as vast:
        env |= {
            "GRPC_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "VASTAI_VLLM_URL": vast.base_url,
            "VASTAI_MODEL": MODAL_MODEL,
            "INFERENCE_API_KEYS_FILE": keys,
            "TENANTS_FILE": policy,
            "CONFIG_RELOAD_INTERVAL_S": "0",  # the signal alone
            "LOG_FORMAT": "json",
            "SHUTDOWN_GRACE_S": "1",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            wait_serving(f"127.0.0.1:{port}")
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                assert (
                    stub.Chat(pb.ChatRequest(messages=HELLO), metadata=bearer(ALPHA), timeout=10).provider == "vastai"
                )
                rewrite(policy, '[tenants.alpha]\nmodels = ["approved"]\n')
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while True:
                    try:
                        stub.Chat(pb.ChatRequest(messages=HELLO), metadata=bearer(ALPHA), timeout=10)
                    except grpc.RpcError as exc:
                        assert exc.code() is grpc.StatusCode.PERMISSION_DENIED
                        break
                    assert time.monotonic() < deadline, "SIGHUP did not reload TENANTS_FILE"
                    time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    lines = out.decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert proc.returncode == 0
    assert all({"time", "level", "logger"} <= set(r) for r in records)
    reload = next(r for r in records if r["logger"] == "service.audit" and r["event"] == "policy_reload")
    assert reload["trigger"] == "SIGHUP" and reload["changed"] == "tenants" and reload["outcome"] == "ok"
    access = [r for r in records if r["logger"] == "service.access"]
    assert access and access[0]["method"] == "Chat" and "message" not in access[0], "fields at the top level"
    assert ALPHA not in out.decode()
