"""The LiteLLM proxy as a peer gateway: install check, config for the fake upstream, start.

LiteLLM lives in its own venv (``bench/.venv-litellm``, made by ``bench/setup_litellm.sh`` with an
exact pin) because its dependency pins would fight the service's. It is configured with the same
two models the fake upstream serves, as ``openai/<model>`` with ``api_base`` on the upstream, so
the proxy forwards to exactly what the gateway forwards to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from bench.procs import ProcessGroup, free_port, http_ok, wait_until
from bench.scenarios import FAST_MODEL, GAP_MODEL, PACED_MODEL

SETUP_SCRIPT = Path(__file__).resolve().parent / "setup_litellm.sh"


def installed_version(venv: Path) -> str | None:
    """The litellm version in ``venv``, or None."""
    if not (venv / "bin" / "litellm").exists():
        return None
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "from importlib.metadata import version; print(version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def ensure_installed(venv: Path, install: bool) -> tuple[str, str]:
    """("ok", "litellm X.Y.Z") or ("skipped", why); runs the setup script when allowed."""
    version = installed_version(venv)
    if version is None and install:
        print(f"installing LiteLLM with {SETUP_SCRIPT} (once; 1-2 minutes)", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return "skipped", "bench/setup_litellm.sh timed out"
        if proc.returncode != 0:
            return "skipped", f"bench/setup_litellm.sh failed: {(proc.stderr or proc.stdout).strip()[-400:]}"
        version = installed_version(venv)
    if version is None:
        return "skipped", f"LiteLLM is not installed in {venv} (run bash bench/setup_litellm.sh)"
    return "ok", f"litellm {version}"


def config_yaml(upstream_url: str) -> str:
    """The proxy config: the three fake models, no retries, no DB, no callbacks."""
    lines = ["model_list:"]
    for model in (FAST_MODEL, PACED_MODEL, GAP_MODEL):
        lines += [
            f"  - model_name: {model}",
            "    litellm_params:",
            f"      model: openai/{model}",
            f"      api_base: {upstream_url}/v1",
            "      api_key: sk-bench-fake",
        ]
    lines += [
        "litellm_settings:",
        "  drop_params: true",
        "  num_retries: 0",
        "  request_timeout: 120",
        "  telemetry: false",
        "general_settings:",
        "  disable_spend_logs: true",
        "",
    ]
    return "\n".join(lines)


def start_litellm(group: ProcessGroup, venv: Path, upstream_url: str, out: Path, cpu: int | None) -> tuple[Any, str]:
    """Starts ``litellm --config`` (one uvicorn worker) and waits until it proxies a request."""
    cfg = out / "logs" / "litellm_config.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(config_yaml(upstream_url))
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "LITELLM_", "DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH"))
    }
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from the internet
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "NO_DOCS": "True",
        }
    )
    cmd = [
        str(venv / "bin" / "litellm"),
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    proc = group.start("litellm", cmd, env=env, cpu=cpu)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(url + "/health/liveliness", 2.0), 180, proc, "LiteLLM proxy")
    body = json.dumps({"model": FAST_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        data = json.loads(resp.read())
    if not data.get("choices"):
        raise RuntimeError(f"LiteLLM answered without choices: {str(data)[:300]}")
    return proc, url
