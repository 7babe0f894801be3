"""Deployment settings for the Modal vLLM app, in pure Python.

This module never imports ``modal``: the gateway, the status CLI and the tests read the same
constants and settings without the SDK's import cost, and ``deployment.py`` builds the Modal
objects from them. Settings come from environment variables at deploy time; every bad value
raises :class:`ValueError` naming the variable and the value, so a typo fails the deploy instead
of silently deploying a default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

# --- Pinned names and versions -------------------------------------------------------------

APP_NAME = "multi-agent-vllm-inference"
"""Modal app name; part of the web URL, and what ``status`` looks up with the SDK."""

FUNCTION_NAME = "serve"
"""Name of the web-server function; the URL is ``https://<workspace>--<app>-<function>.modal.run``."""

VLLM_VERSION = "0.11.2"
"""Pinned so a redeploy never changes the engine (and its flags) underneath the gateway."""

CUDA_IMAGE_TAG = "nvidia/cuda:12.8.1-devel-ubuntu22.04"
"""CUDA 12.8 matches the vLLM wheels; ``devel`` ships the compilers FlashInfer's JIT needs."""

PYTHON_VERSION = "3.12"
"""Python added to the CUDA image; a version vLLM publishes wheels for."""

VLLM_PORT = 8000
"""Port ``vllm serve`` listens on inside the container; Modal proxies HTTPS to it."""

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
"""Fits an L4's 24 GB in bf16 (~15 GB weights) with room for a 4096-token KV cache."""

DEFAULT_MODEL_REVISION = "a09a35458c702b33eeacc393d103063234e8bc28"
"""The pin: the Hugging Face commit of Qwen/Qwen2.5-7B-Instruct we deploy; weights never drift."""

ACCEPTED_GPU_TYPES = ("L4", "A10G", "A100", "H100")
"""GPU types this deployment is sized and priced for (see ``pricing.py``)."""

HF_CACHE_VOLUME = "huggingface-cache"
"""Volume holding downloaded weights, so only the first cold start pays the download."""

HF_CACHE_PATH = "/root/.cache/huggingface"
"""Where huggingface_hub looks for its cache inside the container."""

VLLM_CACHE_VOLUME = "vllm-cache"
"""Volume holding vLLM's torch.compile / CUDA-graph artefacts, which shortens later cold starts."""

VLLM_CACHE_PATH = "/root/.cache/vllm"
"""Where vLLM keeps its compile cache inside the container."""

VLLM_API_KEY_ENV = "VLLM_API_KEY"
"""Key the optional ``modal.Secret`` must hold. vLLM reads it from its environment, so it never
appears on the command line (where ``ps`` and crash logs would show it)."""

HF_TOKEN_ENV = "HF_TOKEN"
"""Key the optional Hugging Face ``modal.Secret`` must hold; gated models need it to download."""

TOOL_CALLING_MODEL_PARSERS = (("qwen2.5", "hermes"),)
"""(model id fragment, vLLM tool-call parser) turned on by default: Qwen2.5's chat template
emits Hermes-style ``<tool_call>`` blocks. Other models get none unless MODAL_TOOL_CALL_PARSER
names one."""

_PARSER_NAME = re.compile(r"^[a-z0-9_]+$")
_PARSER_OFF = frozenset({"none", "off", "false", "0"})

# --- Defaults for the tunable settings -----------------------------------------------------

DEFAULT_GPU_TYPE = "L4"
DEFAULT_SCALEDOWN_WINDOW_MINUTES = 5.0
DEFAULT_MAX_CONCURRENT_REQUESTS = 32
DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_FAST_BOOT = True  # scale to zero means many cold starts: boot time is what users wait for

# Modal rejects scaledown windows outside 2..3600 s; checking here gives a message naming our
# variable instead of the SDK's parameter name.
MIN_SCALEDOWN_WINDOW_S = 2
MAX_SCALEDOWN_WINDOW_S = 3600

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class DeploymentSettings:
    """What one deploy of the Modal vLLM app is configured with.

    Attributes:
        model: Hugging Face model id, also the served model name clients send (``MODAL_MODEL``).
        model_revision: Hugging Face commit to load; empty means the hub's default branch
            (``MODAL_MODEL_REVISION``).
        gpu: Modal GPU type, upper-cased, one of :data:`ACCEPTED_GPU_TYPES` (``MODAL_GPU_TYPE``).
        scaledown_window_minutes: Idle minutes before Modal stops the container
            (``MODAL_SCALEDOWN_WINDOW_MINUTES``).
        max_concurrent_requests: Requests one container takes at once; also vLLM's
            ``--max-num-seqs`` (``MAX_CONCURRENT_REQUESTS``).
        max_model_len: Context length in tokens (``MODAL_MAX_MODEL_LEN``).
        require_proxy_auth: Whether Modal demands Modal-Key/Modal-Secret headers
            (``MODAL_REQUIRE_PROXY_AUTH``).
        vllm_api_key_secret: Name of a ``modal.Secret`` holding ``VLLM_API_KEY``; empty means
            vLLM runs without an API key (``MODAL_VLLM_API_KEY_SECRET``).
        hf_token_secret: Name of a ``modal.Secret`` holding ``HF_TOKEN``, for gated models;
            empty means anonymous downloads (``MODAL_HF_TOKEN_SECRET``).
        fast_boot: Run vLLM eagerly (``--enforce-eager``: no torch.compile, no CUDA graphs), the
            shortest cold start at some cost in tokens per second; false compiles and captures
            CUDA graphs for batch sizes up to ``max_concurrent_requests`` only (``MODAL_FAST_BOOT``).
        tool_call_parser: vLLM tool-call parser; sets ``--enable-auto-tool-choice
            --tool-call-parser``. Empty means no tool calling. Default ``hermes`` for Qwen2.5
            models, none for others (``MODAL_TOOL_CALL_PARSER``; ``none`` turns it off).
    """

    model: str = DEFAULT_MODEL
    model_revision: str = DEFAULT_MODEL_REVISION
    gpu: str = DEFAULT_GPU_TYPE
    scaledown_window_minutes: float = DEFAULT_SCALEDOWN_WINDOW_MINUTES
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    require_proxy_auth: bool = True
    vllm_api_key_secret: str = ""
    hf_token_secret: str = ""
    fast_boot: bool = DEFAULT_FAST_BOOT
    tool_call_parser: str = "hermes"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DeploymentSettings:
        """Builds settings from environment variables; unset or blank variables take defaults.

        Args:
            env: The environment, usually ``os.environ``.

        Returns:
            The validated settings.

        Raises:
            ValueError: A variable holds a bad value; the message names it and the value.
        """
        model = _get(env, "MODAL_MODEL") or DEFAULT_MODEL
        # The pinned revision is a commit of the default model only; applying it to another
        # model would fail the first download with "revision not found".
        default_revision = DEFAULT_MODEL_REVISION if model == DEFAULT_MODEL else ""
        revision = _get(env, "MODAL_MODEL_REVISION") or default_revision

        gpu = (_get(env, "MODAL_GPU_TYPE") or DEFAULT_GPU_TYPE).upper()
        if gpu not in ACCEPTED_GPU_TYPES:
            raise ValueError(
                f"MODAL_GPU_TYPE={_get(env, 'MODAL_GPU_TYPE')!r} is not supported; "
                f"accepted: {', '.join(ACCEPTED_GPU_TYPES)}"
            )

        window = _positive_float(env, "MODAL_SCALEDOWN_WINDOW_MINUTES")
        if window is None:
            window = DEFAULT_SCALEDOWN_WINDOW_MINUTES
        window_s = round(window * 60)
        if not MIN_SCALEDOWN_WINDOW_S <= window_s <= MAX_SCALEDOWN_WINDOW_S:
            raise ValueError(
                f"MODAL_SCALEDOWN_WINDOW_MINUTES={window:g} is out of range; Modal accepts "
                f"{MIN_SCALEDOWN_WINDOW_S} s to {MAX_SCALEDOWN_WINDOW_S // 60} minutes"
            )

        return cls(
            model=model,
            model_revision=revision,
            gpu=gpu,
            scaledown_window_minutes=window,
            max_concurrent_requests=_positive_int(env, "MAX_CONCURRENT_REQUESTS") or DEFAULT_MAX_CONCURRENT_REQUESTS,
            max_model_len=_positive_int(env, "MODAL_MAX_MODEL_LEN") or DEFAULT_MAX_MODEL_LEN,
            require_proxy_auth=_bool(env, "MODAL_REQUIRE_PROXY_AUTH", default=True),
            vllm_api_key_secret=_get(env, "MODAL_VLLM_API_KEY_SECRET"),
            hf_token_secret=_get(env, "MODAL_HF_TOKEN_SECRET"),
            fast_boot=_bool(env, "MODAL_FAST_BOOT", default=DEFAULT_FAST_BOOT),
            tool_call_parser=_tool_call_parser(env, model),
        )

    @property
    def scaledown_window_s(self) -> int:
        """The scale-down window in whole seconds, as Modal takes it."""
        return round(self.scaledown_window_minutes * 60)

    def to_env(self) -> dict[str, str]:
        """Renders the settings back into the variables :meth:`from_env` reads.

        The deployment passes these to the container, which re-imports ``deployment.py`` and so
        re-reads its settings there: without them the container would fall back to defaults and
        could serve a different model than the one the deploy was configured with.

        Returns:
            Variable name to value, empty values left out (they mean "default");
            ``from_env(settings.to_env()) == settings``.
        """
        values = {
            "MODAL_MODEL": self.model,
            "MODAL_MODEL_REVISION": self.model_revision,
            "MODAL_GPU_TYPE": self.gpu,
            "MODAL_SCALEDOWN_WINDOW_MINUTES": f"{self.scaledown_window_minutes:g}",
            "MAX_CONCURRENT_REQUESTS": str(self.max_concurrent_requests),
            "MODAL_MAX_MODEL_LEN": str(self.max_model_len),
            "MODAL_REQUIRE_PROXY_AUTH": "true" if self.require_proxy_auth else "false",
            "MODAL_VLLM_API_KEY_SECRET": self.vllm_api_key_secret,
            "MODAL_HF_TOKEN_SECRET": self.hf_token_secret,
            "MODAL_FAST_BOOT": "true" if self.fast_boot else "false",
            # "none", not empty: empty means "the model's default", which may be a parser.
            "MODAL_TOOL_CALL_PARSER": self.tool_call_parser or "none",
        }
        return {name: value for name, value in values.items() if value}

    @property
    def cudagraph_capture_sizes(self) -> list[int]:
        """Batch sizes vLLM captures CUDA graphs for when not ``fast_boot``.

        vLLM's default captures dozens of sizes up to 512, each costing boot time; a container
        never batches more than ``max_concurrent_requests`` sequences, so powers of two up to
        that (and that number itself) are all that can be used.
        """
        sizes = [1]
        while sizes[-1] * 2 <= self.max_concurrent_requests:
            sizes.append(sizes[-1] * 2)
        if sizes[-1] != self.max_concurrent_requests:
            sizes.append(self.max_concurrent_requests)
        return sizes


def vllm_serve_command(settings: DeploymentSettings) -> list[str]:
    """Builds the argv of ``vllm serve`` for these settings (run without a shell).

    The API key is not an argument: vLLM reads ``VLLM_API_KEY`` from the environment
    (:func:`vllm_serve_environment`), and a command line is visible to every process.

    Args:
        settings: The deployment settings.

    Returns:
        The argv list, starting with ``vllm``.
    """
    argv = ["vllm", "serve", settings.model]
    if settings.model_revision:
        argv += ["--revision", settings.model_revision]
    argv += [
        # Clients (and the gateway's model check) use the Hugging Face id, not a local path.
        "--served-model-name",
        settings.model,
        # Modal's proxy reaches the server over the container's network interface.
        "--host",
        "0.0.0.0",
        "--port",
        str(VLLM_PORT),
        # Bounds the KV cache per sequence so the model fits the GPU with room for batching.
        "--max-model-len",
        str(settings.max_model_len),
        # Batch every request Modal routes to this container (@modal.concurrent) at once.
        "--max-num-seqs",
        str(settings.max_concurrent_requests),
        # Request lines in `modal app logs` are how a cold start or a 4xx gets diagnosed.
        "--uvicorn-log-level=info",
    ]
    if settings.fast_boot:
        # Skips torch.compile and CUDA graph capture: the shortest boot, as Modal's vLLM
        # example offers for scale-to-zero; decoding is somewhat slower.
        argv += ["--enforce-eager"]
    else:
        sizes = json.dumps({"cudagraph_capture_sizes": settings.cudagraph_capture_sizes}, separators=(",", ":"))
        argv += ["--no-enforce-eager", "--compilation-config", sizes]
    if settings.tool_call_parser:
        # Without these vLLM rejects requests carrying `tools` with tool_choice "auto".
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", settings.tool_call_parser]
    return argv


def vllm_serve_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment ``vllm serve`` runs with: the container's, keys checked.

    ``VLLM_API_KEY`` and ``HF_TOKEN`` arrive from ``modal.Secret``s as environment variables and
    are passed on that way; a blank one is dropped, so an empty secret value means "no key"
    rather than a key that is the empty string.

    Args:
        environ: The container's environment, usually ``os.environ``.

    Returns:
        A new dict for ``subprocess.Popen(env=...)``.
    """
    env = dict(environ)
    for name in (VLLM_API_KEY_ENV, HF_TOKEN_ENV):
        if not env.get(name, "").strip():
            env.pop(name, None)
    return env


def _tool_call_parser(env: Mapping[str, str], model: str) -> str:
    raw = _get(env, "MODAL_TOOL_CALL_PARSER").lower()
    if not raw:
        lowered = model.lower()
        return next((parser for fragment, parser in TOOL_CALLING_MODEL_PARSERS if fragment in lowered), "")
    if raw in _PARSER_OFF:
        return ""
    if not _PARSER_NAME.match(raw):
        raise ValueError(
            f"MODAL_TOOL_CALL_PARSER must be a vLLM tool-call parser name (e.g. hermes, mistral, "
            f"llama3_json) or none, got {raw!r}"
        )
    return raw


def _get(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _positive_float(env: Mapping[str, str], name: str) -> float | None:
    raw = _get(env, name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive number, got {raw!r}") from None
    # NaN compares false with everything, so `not value > 0` also rejects it.
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive number, got {raw!r}")
    return value


def _positive_int(env: Mapping[str, str], name: str) -> int | None:
    raw = _get(env, name)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _bool(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = _get(env, name).lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")
