"""``python -m clients``: chat, health and provider status from a shell.

Connection options (``--target``, ``--api-key``, ``--ca``, ``--server-name``, ``--timeout``) go
anywhere on the line, before or after the subcommand, and default to ``INFERENCE_TARGET``,
``INFERENCE_API_KEY`` and ``INFERENCE_CA_FILE``. Exit codes: 0 ok, 1 the call failed, 2 bad
usage or configuration, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, TextIO

from google.protobuf import json_format

from clients import __version__
from clients.connection import API_KEY_ENV, CA_FILE_ENV, DEFAULT_TARGET, TARGET_ENV
from clients.errors import ClientConfigError, InferenceError
from clients.options import DEFAULT_TIMEOUT_S, ChatOptions, RetryPolicy
from clients.sync_client import InferenceClient
from clients.types import ChatResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_RAW = argparse.RawDescriptionHelpFormatter

CHAT_EXAMPLES = """examples:
  python -m clients chat "Say hello" --max-tokens 32
  python -m clients chat "Count to five" --stream --target 10.0.0.5:50051
  python -m clients chat "List three colours" --stream --json      # NDJSON, one object per message
  echo "Summarise this" | python -m clients chat - --system "Be brief" --cold-start wait
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
  python -m clients health --target 127.0.0.1:50051
  python -m clients --version

environment: {TARGET_ENV} (default {DEFAULT_TARGET}), {API_KEY_ENV}, {CA_FILE_ENV}
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
            return _chat(client, args)
        except InferenceError as exc:
            _print_error(exc, as_json=getattr(args, "json", False))
            return EXIT_FAILED


def _chat(client: InferenceClient, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = _chat_options(args)
    out = sys.stdout
    if not args.stream:
        result = client.chat(prompt, **options)
        if args.json:
            print(json.dumps(asdict(result), indent=2))
        else:
            print(result.text)
            _summary(result)
        return EXIT_OK
    with client.chat_stream(prompt, **options) as stream:
        for text in stream:
            out.write(json.dumps({"delta": {"text": text}}) + "\n" if args.json else text)
            out.flush()
    final = stream.final
    if args.json:
        if final is not None:
            _write_line(out, {"final": asdict(final)})
    else:
        out.write("\n")
        if final is not None:
            _summary(final)
    return EXIT_OK


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{chat,health,providers}")

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
    return parser
