"""``python -m clients``: chat, the model catalogue, health, provider status and usage from a shell.

Connection options (``--target``, ``--api-key``, ``--ca``, ``--server-name``, ``--lb``, ``--timeout``)
go anywhere on the line, before or after the subcommand, and default to ``INFERENCE_TARGET``,
``INFERENCE_API_KEY``, ``INFERENCE_CA_FILE`` and ``INFERENCE_LOAD_BALANCING``. Exit codes: 0 ok, 1 the
call failed, 2 bad usage or configuration, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format

from clients import __version__, usage_cli
from clients.agent import image_url, tool_message
from clients.connection import (
    API_KEY_ENV,
    CA_FILE_ENV,
    DEFAULT_TARGET,
    LOAD_BALANCING_ENV,
    LOAD_BALANCING_POLICIES,
    TARGET_ENV,
)
from clients.errors import ClientConfigError, InferenceError
from clients.options import DEFAULT_TIMEOUT_S, ChatOptions, RetryPolicy
from clients.sync_client import InferenceClient
from clients.types import ChatResult, ToolCall

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_RAW = argparse.RawDescriptionHelpFormatter

CHAT_EXAMPLES = """examples:
  python -m clients chat "Say hello" --max-tokens 32
  python -m clients chat "Count to five" --stream --target 10.0.0.5:50051
  python -m clients chat "List three colours" --stream --json      # NDJSON, one object per message
  echo "Summarise this" | python -m clients chat - --system "Be brief" --cold-start wait
  python -m clients chat "Name a colour" --schema schema.json     # prints the JSON, checked against it
  python -m clients chat "What is in this picture?" --image photo.png --image https://example.com/b.jpg
  python -m clients chat "Weather in Paris?" --tool tools.json --tool-choice required --json
"""

MODELS_EXAMPLES = """examples:
  python -m clients models
  python -m clients models --json --target gateway.internal:50051
"""

HEALTH_EXAMPLES = """examples:
  python -m clients health
  python -m clients health --target gateway.internal:50051 --ca ca.pem
"""

PROVIDERS_EXAMPLES = """examples:
  INFERENCE_API_KEY=<admin token> python -m clients providers
"""

TOP_EXAMPLES = f"""examples:
  python -m clients chat "Say hello" --stream
  python -m clients models
  python -m clients health --target 127.0.0.1:50051
  python -m clients chat "Hi" --target dns:///gateway-headless:50051 --lb round_robin   # every replica
  python -m clients usage --by provider,day --since 2026-11-01 --plot usage.png
  python -m clients --version

environment: {TARGET_ENV} (default {DEFAULT_TARGET}), {API_KEY_ENV}, {CA_FILE_ENV}, {LOAD_BALANCING_ENV}
"""


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Runs the CLI.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.
        env: Where ``INFERENCE_*`` defaults are read; ``os.environ`` when None.

    Returns:
        The exit code.
    """
    args = _parser().parse_args(argv)
    environ = os.environ if env is None else env
    try:
        return _run(args, environ)
    except ClientConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # The `with` blocks have cancelled the call on the way out; the server stops generating.
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    retry = RetryPolicy(
        max_retries=args.retries, initial_delay_s=args.retry_delay, retry_rate_limited=args.retry_rate_limited
    )
    client = InferenceClient(
        getattr(args, "target", None),
        api_key=getattr(args, "api_key", None),
        ca_file=getattr(args, "ca", None),
        server_name=getattr(args, "server_name", None),
        load_balancing=getattr(args, "lb", None),
        timeout_s=getattr(args, "timeout", DEFAULT_TIMEOUT_S),
        retry=retry,
        env=env,
    )
    with client:
        try:
            if args.command == "health":
                health = client.health(timeout_s=client.timeout_s)
                print(json.dumps(asdict(health), indent=2))
                return EXIT_OK if health.status == "SERVING" else EXIT_FAILED
            if args.command == "providers":
                status = client.provider_status(timeout_s=client.timeout_s)
                print(json.dumps(json_format.MessageToDict(status), indent=2))
                return EXIT_OK
            if args.command == "models":
                return _models(client, as_json=args.json)
            if args.command == "usage":
                return usage_cli.run(client, args)
            return _chat(client, args)
        except InferenceError as exc:
            _print_error(exc, as_json=getattr(args, "json", False))
            return EXIT_FAILED


def _models(client: InferenceClient, *, as_json: bool) -> int:
    models = client.list_models(timeout_s=client.timeout_s)
    if as_json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return EXIT_OK
    for i, model in enumerate(models):
        routes = ", ".join(f"{r.provider}={r.model}" for r in model.routes)
        print(f"{model.name}{' (default)' if i == 0 else ''}: {routes}")
    return EXIT_OK


def _chat(client: InferenceClient, args: argparse.Namespace) -> int:
    options = _chat_options(args)  # before stdin is read: a bad file is reported at once
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    out = sys.stdout
    if not args.stream:
        result = client.chat(prompt, **options)
        if args.json:
            print(json.dumps(_result_dict(result, schema=args.schema is not None), indent=2))
        else:
            if result.text or not result.tool_calls:
                print(_pretty_json(result.text) if args.schema is not None else result.text)
            _print_tool_calls(result.tool_calls)
            _summary(result)
        return EXIT_OK
    with client.chat_stream(prompt, **options) as stream:
        for event in stream.events():
            if isinstance(event, str):
                out.write(json.dumps({"delta": {"text": event}}) + "\n" if args.json else event)
            elif args.json:
                out.write(json.dumps({"delta": {"tool_calls": [asdict(event)]}}) + "\n")
            out.flush()
    final = stream.final
    if args.json:
        if final is not None:
            _write_line(out, {"final": _result_dict(final, schema=args.schema is not None)})
    else:
        if stream.text or not stream.tool_calls:
            out.write("\n")
        if final is not None:
            _print_tool_calls(final.tool_calls)
            _summary(final)
    return EXIT_OK


def _result_dict(result: ChatResult, *, schema: bool) -> dict[str, Any]:
    out = result.to_dict()
    if schema and result.text:
        out["parsed"] = json.loads(result.text)  # the gateway checked it against the schema
    return out


def _pretty_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text  # a tool call instead of JSON leaves no text: print what came


def _print_tool_calls(calls: Sequence[ToolCall]) -> None:
    for call in calls:
        try:
            arguments = json.dumps(call.args(), ensure_ascii=False)  # one line, however the model spaced it
        except ValueError:
            arguments = call.arguments
        print(f"tool call {call.id}: {call.name} {arguments}")


def _load_json(path: str, flag: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise ClientConfigError(f"cannot read {flag} {path!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ClientConfigError(f"{flag} {path!r} is not JSON: {exc}") from None


def _agent_options(args: argparse.Namespace, options: ChatOptions) -> None:
    """--schema, --tool, --tool-choice, --image and --metadata; file problems exit 2 before any call."""
    if args.schema is not None:
        schema = _load_json(args.schema, "--schema")
        if not isinstance(schema, dict):
            raise ClientConfigError(f"--schema {args.schema!r} must hold a JSON Schema object")
        options["response_format"] = schema
    tools: list[dict[str, Any]] = []
    for path in args.tool or ():
        loaded = _load_json(path, "--tool")
        for tool in loaded if isinstance(loaded, list) else [loaded]:
            try:
                tool_message(tool)
            except (TypeError, ValueError, AttributeError) as exc:
                raise ClientConfigError(f"--tool {path!r}: not a tool ({exc})") from None
            tools.append(tool)
    if tools:
        options["tools"] = tools
    if args.tool_choice:
        options["tool_choice"] = args.tool_choice
    images = []
    for image in args.image or ():
        try:
            images.append(image_url(image))  # read now, so a bad file is one line and exit 2
        except OSError as exc:
            raise ClientConfigError(f"cannot read --image {image!r}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ClientConfigError(str(exc)) from None
    if images:
        options["images"] = images
    tags = {}
    for item in args.metadata or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClientConfigError(f"--metadata {item!r}: use KEY=VALUE")
        tags[key] = value
    if tags:
        options["metadata"] = tags


def _chat_options(args: argparse.Namespace) -> ChatOptions:
    """The CLI's chat flags as the library's options (one place to add a new flag's option)."""
    options: ChatOptions = {}
    for flag, key in (
        ("system", "system"),
        ("model", "model"),
        ("max_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("seed", "seed"),
    ):
        value = getattr(args, flag)
        if value is not None:
            options[key] = value  # type: ignore[literal-required]  # keys above are ChatOptions keys
    if args.stop:
        options["stop"] = args.stop
    if args.cold_start is not None:
        options["wait_for_cold_start"] = args.cold_start == "wait"
    _agent_options(args, options)
    return options


def _summary(result: ChatResult) -> None:
    print(
        f"[{result.provider} {result.model} finish={result.finish_reason} "
        f"tokens={result.usage.prompt_tokens}+{result.usage.completion_tokens}]",
        file=sys.stderr,
    )


def _print_error(exc: InferenceError, *, as_json: bool) -> None:
    if as_json:
        error: dict[str, Any] = {
            "code": exc.code,
            "message": exc.message,
            "reason": exc.reason,
            "metadata": exc.metadata,
        }
        if exc.field_violations:
            error["field_violations"] = exc.field_violations
        if exc.retry_after_s is not None:
            error["retry_after_s"] = exc.retry_after_s
        _write_line(sys.stdout, {"error": error})
        return
    print(f"error: {exc}", file=sys.stderr)
    for field, why in exc.field_violations.items():
        print(f"  {field}: {why}", file=sys.stderr)


def _write_line(out: TextIO, obj: Mapping[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _connection_options() -> argparse.ArgumentParser:
    # SUPPRESS: an option left out at one level must not overwrite the value given at the other.
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection (anywhere on the line)")
    group.add_argument(
        "--target", default=argparse.SUPPRESS, help=f"host:port (default ${TARGET_ENV}, else {DEFAULT_TARGET})"
    )
    group.add_argument("--api-key", default=argparse.SUPPRESS, help=f"bearer token (default ${API_KEY_ENV})")
    group.add_argument(
        "--ca",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"PEM of the CA that signed the server certificate; turns TLS on (default ${CA_FILE_ENV})",
    )
    group.add_argument("--server-name", default=argparse.SUPPRESS, help="name to check the certificate against")
    group.add_argument(
        "--lb",
        choices=LOAD_BALANCING_POLICIES,
        default=argparse.SUPPRESS,
        help=f"round_robin spreads calls over every address the target resolves to (default ${LOAD_BALANCING_ENV}, "
        "else pick_first: one address)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="S",
        help=f"seconds for the whole call, retries included (default {DEFAULT_TIMEOUT_S:g})",
    )
    group.add_argument(
        "--retries", type=int, default=argparse.SUPPRESS, metavar="N", help="retries of UNAVAILABLE (default 3)"
    )
    group.add_argument(
        "--retry-delay",
        type=float,
        default=argparse.SUPPRESS,
        metavar="S",
        help="first backoff, doubling with jitter (default 0.25)",
    )
    group.add_argument(
        "--retry-rate-limited",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also retry RESOURCE_EXHAUSTED after the delay the server asks for",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _connection_options()
    parser = argparse.ArgumentParser(
        prog="python -m clients",
        description="Chat with the inference gateway, or ask it how it is.",
        epilog=TOP_EXAMPLES,
        formatter_class=_RAW,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(retries=3, retry_delay=0.25, retry_rate_limited=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{chat,models,health,providers,usage}")

    chat = sub.add_parser(
        "chat", parents=[common], help="ask for an answer", epilog=CHAT_EXAMPLES, formatter_class=_RAW
    )
    chat.add_argument("prompt", help='the user message; "-" reads it from stdin')
    chat.add_argument("--stream", action="store_true", help="print text as it arrives")
    chat.add_argument("--json", action="store_true", help="print JSON (with --stream: one object per message)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--model", help="model or catalogue name (default: the service's)")
    chat.add_argument("--max-tokens", type=int, metavar="N")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--stop", action="append", metavar="TEXT", help="stop sequence (repeatable)")
    chat.add_argument("--seed", type=int)
    chat.add_argument(
        "--cold-start", choices=("wait", "fallback"), help="wait for a cold provider, or use the next one at once"
    )
    agent = chat.add_argument_group("tools, structured output, images")
    agent.add_argument(
        "--schema", metavar="FILE", help="JSON Schema file: the answer is JSON that fits it (printed as JSON)"
    )
    agent.add_argument(
        "--tool",
        action="append",
        metavar="FILE",
        help='JSON file of a tool or a list of tools ({"name", "description", "parameters"}; repeatable)',
    )
    agent.add_argument("--tool-choice", metavar="MODE", help="auto, none, required, or the name of the tool to call")
    agent.add_argument(
        "--image", action="append", metavar="PATH|URL", help="image file (sent inline) or https: URL (repeatable)"
    )
    agent.add_argument(
        "--metadata", action="append", metavar="KEY=VALUE", help="tag kept with the call's usage record (repeatable)"
    )

    models = sub.add_parser(
        "models",
        parents=[common],
        help="print the model catalogue (the default first)",
        epilog=MODELS_EXAMPLES,
        formatter_class=_RAW,
    )
    models.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser(
        "health", parents=[common], help="print the service's health", epilog=HEALTH_EXAMPLES, formatter_class=_RAW
    )
    sub.add_parser(
        "providers",
        parents=[common],
        help="print every provider's status (admin key)",
        epilog=PROVIDERS_EXAMPLES,
        formatter_class=_RAW,
    )
    usage_cli.add_parser(sub, common)
    return parser
