"""Command line: ``python -m modal_vllm status|cost``.

``status`` resolves the endpoint from the environment, probes it once and exits 0 when it is
healthy and serves MODAL_MODEL, 1 when it is not, 2 when no endpoint is configured. ``cost``
prints what a budget buys on each GPU. Remember that a status probe wakes a scaled-to-zero
container, which is billed until the scale-down window passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence

from modal_vllm.pricing import DEFAULT_MONTHLY_BUDGET_USD, format_budget_table
from modal_vllm.settings import DEFAULT_MODEL
from modal_vllm.status import (
    DEFAULT_PROBE_TIMEOUT_S,
    EndpointLookupError,
    EndpointStatus,
    probe_endpoint,
    proxy_auth_headers,
    resolve_endpoint,
)

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_NOT_CONFIGURED = 2

NOT_CONFIGURED_MESSAGE = (
    "No Modal endpoint configured: set MODAL_WEB_URL (printed by "
    "`modal deploy modal_vllm/deployment.py`, e.g. "
    "https://<workspace>--multi-agent-vllm-inference-serve.modal.run), or set MODAL_TOKEN_ID and "
    "MODAL_TOKEN_SECRET to look it up. Not deployed yet? See docs/modal.md."
)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Runs the CLI.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.
        env: The environment; defaults to ``os.environ``.

    Returns:
        The process exit code.
    """
    args = _parser().parse_args(argv)
    environ = os.environ if env is None else env
    if args.command == "cost":
        print(format_budget_table(args.budget), end="")
        return EXIT_OK
    return _status(environ, as_json=args.json, timeout_s=args.timeout)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modal_vllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="probe the deployed vLLM endpoint")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_PROBE_TIMEOUT_S,
        metavar="S",
        help=f"per-request timeout in seconds (default {DEFAULT_PROBE_TIMEOUT_S:g})",
    )
    cost = commands.add_parser("cost", help="what a budget buys on each GPU")
    cost.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_MONTHLY_BUDGET_USD,
        metavar="USD",
        help=f"budget in USD (default {DEFAULT_MONTHLY_BUDGET_USD:g})",
    )
    return parser


def _status(env: Mapping[str, str], *, as_json: bool, timeout_s: float) -> int:
    try:
        endpoint = resolve_endpoint(env)
    except (EndpointLookupError, ValueError) as exc:
        return _report_unresolved(str(exc), EXIT_UNHEALTHY, as_json)
    if endpoint is None:
        return _report_unresolved(NOT_CONFIGURED_MESSAGE, EXIT_NOT_CONFIGURED, as_json)

    expected = env.get("MODAL_MODEL", "").strip() or DEFAULT_MODEL
    status = asyncio.run(probe_endpoint(endpoint.url, expected, headers=proxy_auth_headers(env), timeout_s=timeout_s))
    if as_json:
        print(json.dumps({**status.to_dict(), "source": endpoint.source}, indent=2))
    else:
        _print_human(status, endpoint.source)
    return EXIT_OK if status.ok else EXIT_UNHEALTHY


def _report_unresolved(message: str, code: int, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "configured": code != EXIT_NOT_CONFIGURED, "message": message}))
    else:
        print(message, file=sys.stderr)
    return code


def _print_human(status: EndpointStatus, source: str) -> None:
    temperature = "warm" if status.warm else "cold"
    # Without a healthy answer the model list was never asked for, so a match is unknown.
    match = "unknown" if not status.healthy else "yes" if status.model_matches else "NO"
    rows = [
        ("url", f"{status.url} (from {source})"),
        ("healthy", "yes" if status.healthy else "no"),
        ("state", temperature if status.healthy else "cold or starting"),
        ("latency", f"{status.probe_latency_s * 1000:.0f} ms" if status.http_status else "-"),
        ("served models", ", ".join(status.served_models) or "-"),
        ("expected model", f"{status.expected_model} (match: {match})"),
    ]
    for label, value in rows:
        print(f"{label:>15}: {value}")
    print(status.message)


if __name__ == "__main__":
    sys.exit(main())
