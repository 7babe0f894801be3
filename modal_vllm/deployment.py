"""Serve an OpenAI-compatible vLLM endpoint on Modal for the inference gateway.

Read top to bottom: pinned constants, the container image, the caches, the server function, and
a smoke test. Run from the repository root (the image ships the ``modal_vllm`` package from it):

    modal deploy modal_vllm/deployment.py    # deploy; prints the URL for MODAL_WEB_URL
    modal run modal_vllm/deployment.py       # smoke test: health, models, one streamed chat

Settings come from environment variables at deploy time (see ``settings.py`` and
docs/modal.md); a bad value fails here, at import, with a message naming the variable. Importing
this module builds Modal objects lazily and never touches the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import TYPE_CHECKING

import modal

from modal_vllm.launch import wait_until_listening
from modal_vllm.settings import (
    APP_NAME,
    CUDA_IMAGE_TAG,
    HF_CACHE_PATH,
    HF_CACHE_VOLUME,
    HF_TOKEN_ENV,
    PYTHON_VERSION,
    VLLM_API_KEY_ENV,
    VLLM_CACHE_PATH,
    VLLM_CACHE_VOLUME,
    VLLM_PORT,
    VLLM_VERSION,
    DeploymentSettings,
    vllm_serve_command,
    vllm_serve_environment,
)

if TYPE_CHECKING:
    import httpx

# ## Pinned constants
#
# The knobs that change per deploy (model, GPU, scale-down window, concurrency, context length,
# proxy auth, secrets, FAST_BOOT, tool calling) are environment variables, read once here. The
# container re-imports this module, and gets the same values because the function below passes
# them on.

settings = DeploymentSettings.from_env(os.environ)

# Scale to zero means many cold starts, so boot time is what a user waits for: by default vLLM
# runs eagerly (--enforce-eager: no torch.compile, no CUDA graph capture), as Modal's own vLLM
# example offers. MODAL_FAST_BOOT=false compiles and captures graphs for the batch sizes this
# container can see (faster tokens, slower boots).
FAST_BOOT = settings.fast_boot

MINUTES = 60  # seconds

# Huggingface's hub client, pinned so a new release cannot change how weights are fetched;
# the hf_transfer extra downloads the ~15 GB of weights several times faster.
HF_HUB_REQUIREMENT = "huggingface_hub[hf_transfer]==0.36.0"

# The first cold start downloads ~15 GB of weights and compiles CUDA graphs before the port
# opens; later starts read both from the cache volumes and are much shorter.
STARTUP_TIMEOUT_S = 20 * MINUTES

# Longest a single HTTP request may run; Modal's proxy already redirects after 150 s, so this
# only bounds a stream a client keeps reading.
REQUEST_TIMEOUT_S = 10 * MINUTES

# At most one GPU container: traffic beyond MAX_CONCURRENT_REQUESTS queues at Modal instead of
# starting a second GPU, which keeps a burst from doubling the bill of a $30/month budget.
MAX_CONTAINERS = 1

# Scale to zero when idle: no GPU is billed between bursts, at the price of a cold start.
MIN_CONTAINERS = 0

# ## The container image
#
# vLLM wheels need CUDA; the NVIDIA image supplies it and Modal adds Python. `entrypoint([])`
# drops the image's banner-printing entrypoint, which would wrap Modal's own start command.

vllm_image = (
    modal.Image.from_registry(CUDA_IMAGE_TAG, add_python=PYTHON_VERSION)
    .entrypoint([])
    .uv_pip_install(f"vllm=={VLLM_VERSION}", HF_HUB_REQUIREMENT)
    .env({"HF_HUB_ENABLE_HF_TRANSFER": "1"})
    # `modal deploy <file>` ships only that file; the container also needs settings.py.
    .add_local_python_source("modal_vllm")
)

# ## Caches that survive scale-to-zero
#
# Weights and vLLM's compile artefacts live on volumes, so only the first container pays for
# the download and the compilation.

hf_cache_volume = modal.Volume.from_name(HF_CACHE_VOLUME, create_if_missing=True)
vllm_cache_volume = modal.Volume.from_name(VLLM_CACHE_VOLUME, create_if_missing=True)
volumes = {HF_CACHE_PATH: hf_cache_volume, VLLM_CACHE_PATH: vllm_cache_volume}

# ## Secrets
#
# Both are optional named modal.Secrets, never literals here, and both reach vLLM as environment
# variables (never on its command line):
# - VLLM_API_KEY (MODAL_VLLM_API_KEY_SECRET): vLLM then requires it on /v1/*. Without one,
#   Modal's proxy auth is the only guard (on by default).
# - HF_TOKEN (MODAL_HF_TOKEN_SECRET): gated models (Llama, Gemma, ...) refuse anonymous downloads.

secrets = [
    modal.Secret.from_name(name, required_keys=[key])
    for name, key in (
        (settings.vllm_api_key_secret, VLLM_API_KEY_ENV),
        (settings.hf_token_secret, HF_TOKEN_ENV),
    )
    if name
]

# ## The server
#
# One function, `serve`, starts `vllm serve` as a subprocess and lets Modal proxy HTTPS to its
# port. `@modal.concurrent` sends up to MAX_CONCURRENT_REQUESTS requests to one container at
# once, matching vLLM's --max-num-seqs so the engine batches them all.

app = modal.App(APP_NAME)


@app.function(  # type: ignore[untyped-decorator]  # modal is untyped under our mypy config
    image=vllm_image,
    gpu=settings.gpu,
    scaledown_window=settings.scaledown_window_s,
    timeout=REQUEST_TIMEOUT_S,
    startup_timeout=STARTUP_TIMEOUT_S,
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    volumes=volumes,
    secrets=secrets,
    env=settings.to_env(),
)
@modal.concurrent(max_inputs=settings.max_concurrent_requests)  # type: ignore[untyped-decorator]
@modal.web_server(  # type: ignore[untyped-decorator]
    port=VLLM_PORT,
    startup_timeout=STARTUP_TIMEOUT_S,
    requires_proxy_auth=settings.require_proxy_auth,
)
def serve() -> None:
    """Starts vLLM's OpenAI-compatible server; Modal routes requests once the port opens.

    Returns once the port is open. If vLLM exits first, raises at once with its exit code, so
    a broken deploy stops the container instead of billing the whole startup timeout.
    """
    # An argv list, no shell: nothing in the settings can be interpreted as shell syntax.
    process = subprocess.Popen(vllm_serve_command(settings), env=vllm_serve_environment(os.environ))
    took_s = wait_until_listening(process, VLLM_PORT, timeout_s=STARTUP_TIMEOUT_S)
    print(f"vllm serve is listening after {took_s:.1f} s")


# ## Smoke test
#
# `modal run modal_vllm/deployment.py` starts a temporary copy of the app and runs `main`
# locally against it: wait for /health, list models, stream one chat completion. Proxy auth
# headers come from MODAL_PROXY_TOKEN_ID/MODAL_PROXY_TOKEN_SECRET when set.

HEALTH_POLL_INTERVAL_S = 5.0  # a cold start takes minutes; polling faster only adds noise


@app.local_entrypoint()  # type: ignore[untyped-decorator]
def main(prompt: str = "Say hello in five words.", max_tokens: int = 64) -> None:
    """Checks the deployed server end to end and prints a streamed answer.

    Args:
        prompt: The user message to send.
        max_tokens: Cap on the generated tokens.
    """
    # Imported here: the GPU container never runs main, and needs neither module.
    import httpx

    from modal_vllm.status import proxy_auth_headers

    web_url = serve.get_web_url()
    if not web_url:
        raise SystemExit(f"{APP_NAME}/serve has no web URL; is @modal.web_server still on it?")
    base_url = str(web_url).rstrip("/")
    print(f"endpoint: {base_url}")
    # Modal's proxy cuts requests at 150 s, so a longer read timeout would never fire.
    timeout = httpx.Timeout(30.0, read=150.0)
    with httpx.Client(headers=proxy_auth_headers(os.environ), timeout=timeout) as client:
        _wait_until_healthy(client, base_url, STARTUP_TIMEOUT_S)
        models = client.get(f"{base_url}/v1/models")
        models.raise_for_status()
        served = [item["id"] for item in models.json()["data"]]
        print(f"served models: {served}")
        _stream_chat(client, base_url, settings.model, prompt, max_tokens)


def _wait_until_healthy(client: httpx.Client, base_url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    while True:
        try:
            response = client.get(f"{base_url}/health")
            if response.status_code == 200:
                print(f"healthy after {time.monotonic() - started:.1f} s")
                return
            if response.status_code in (401, 403):
                raise SystemExit(
                    f"/health answered {response.status_code}: proxy auth is on; set "
                    "MODAL_PROXY_TOKEN_ID and MODAL_PROXY_TOKEN_SECRET"
                )
            state = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            state = type(exc).__name__  # cold start: the proxy holds or drops the request
        if time.monotonic() >= deadline:
            raise SystemExit(f"not healthy after {timeout_s:g} s (last: {state})")
        print(f"waiting for the server ({state})...")
        time.sleep(HEALTH_POLL_INTERVAL_S)


def _stream_chat(client: httpx.Client, base_url: str, model: str, prompt: str, max_tokens: int) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:  # vLLM reports mid-stream failures inside a 200 response
                raise SystemExit(f"stream failed: {chunk['error']}")
            for choice in chunk.get("choices", []):
                print(choice.get("delta", {}).get("content") or "", end="", flush=True)
    print()
