"""``python -m clients chat "..." [--stream] [--model M] [--system S]`` and ``python -m clients health``.

Target from ``--target`` or ``INFERENCE_TARGET`` (default 127.0.0.1:50051); API key from
``--api-key`` or ``INFERENCE_API_KEY``. Exit codes: 0 ok, 1 the call failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from clients.client import DEFAULT_TARGET, InferenceClient
from clients.errors import InferenceError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--target", default=os.environ.get("INFERENCE_TARGET", DEFAULT_TARGET))
    p.add_argument("--api-key", default=os.environ.get("INFERENCE_API_KEY"))
    p.add_argument("--ca", help="PEM file of the CA that signed the server certificate (enables TLS)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole call")
    sub = p.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="ask for an answer")
    chat.add_argument("prompt")
    chat.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    chat.add_argument("--model")
    chat.add_argument("--system")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--json", action="store_true", help="print the whole result as JSON")
    sub.add_parser("health", help="print the service's health")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI."""
    args = _parser().parse_args(argv)
    ca = open(args.ca, "rb").read() if args.ca else None
    with InferenceClient(args.target, api_key=args.api_key, timeout_s=args.timeout, root_certificates=ca) as client:
        try:
            if args.command == "health":
                health = client.health(timeout_s=args.timeout)
                print(json.dumps(asdict(health), indent=2))
                return 0 if health.status == "SERVING" else 1
            if args.stream:
                with client.chat_stream(
                    args.prompt,
                    system=args.system,
                    model=args.model,
                    max_tokens=args.max_tokens,
                    temperature=args.temperature,
                ) as stream:
                    for text in stream:
                        sys.stdout.write(text)
                        sys.stdout.flush()
                final = stream.final
                sys.stdout.write("\n")
                if final is not None:
                    print(
                        f"[{final.provider} {final.model} finish={final.finish_reason} "
                        f"tokens={final.usage.prompt_tokens}+{final.usage.completion_tokens}]",
                        file=sys.stderr,
                    )
                return 0
            result = client.chat(
                args.prompt,
                system=args.system,
                model=args.model,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
            )
            if args.json:
                print(json.dumps(asdict(result), indent=2))
            else:
                print(result.text)
                print(
                    f"[{result.provider} {result.model} finish={result.finish_reason} "
                    f"tokens={result.usage.prompt_tokens}+{result.usage.completion_tokens}]",
                    file=sys.stderr,
                )
            return 0
        except InferenceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            for field, why in exc.field_violations.items():
                print(f"  {field}: {why}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
