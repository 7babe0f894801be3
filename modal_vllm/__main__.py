"""Command line: ``python -m modal_vllm status|cost``.

``status`` resolves the endpoint from the environment. With a Modal API token
(MODAL_TOKEN_ID/MODAL_TOKEN_SECRET) it first asks Modal how many containers are running, which
wakes nothing: at zero it reports "cold" and stops (``--wake`` probes anyway). Otherwise, or
with containers running, it probes /health and /v1/models. Without a token it cannot know, so it
warns before a probe that may start a GPU (billed until the scale-down window passes).

Exit codes: 0 healthy and serving MODAL_MODEL, 1 anything wrong, 2 no endpoint configured,
3 cold (Modal reports zero containers; nothing was probed). ``cost`` prints what a budget buys
on each GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence

from modal_vllm.pricing import DEFAULT_MONTHLY_BUDGET_USD, format_budget_table, parse_price_overrides
from modal_vllm.sdk import FunctionStats, ModalApiError, StatsSource, WebUrlLookup, read_stats, tokens_configured
from modal_vllm.settings import DEFAULT_MODEL
from modal_vllm.status import (
    DEFAULT_PROBE_TIMEOUT_S,
    EndpointLookupError,
    EndpointStatus,
    cold_status,
    probe_endpoint,
    proxy_auth_headers,
    resolve_endpoint,
)

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_NOT_CONFIGURED = 2
EXIT_COLD = 3

NOT_CONFIGURED_MESSAGE = (
    "No Modal endpoint configured: set MODAL_WEB_URL (printed by "
    "`modal deploy modal_vllm/deployment.py`, e.g. "
    "https://<workspace>--multi-agent-vllm-inference-serve.modal.run), or set MODAL_TOKEN_ID and "
    "MODAL_TOKEN_SECRET to look it up. Not deployed yet? See docs/modal.md."
)


def main(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    stats_source: StatsSource | None = None,
    lookup: WebUrlLookup | None = None,
) -> int:
    """Runs the CLI.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.
        env: The environment; defaults to ``os.environ``.
        stats_source: Replaces the Modal SDK's container count (tests).
        lookup: Replaces the Modal SDK's URL lookup (tests).

    Returns:
        The process exit code.
    """
    args = _parser().parse_args(argv)
    environ = os.environ if env is None else env
    if args.command == "cost":
        try:
            prices = parse_price_overrides(args.price)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_NOT_CONFIGURED
        print(format_budget_table(args.budget, prices), end="")
        print("(prices: the original design's figures unless overridden with --price; see modal.com/pricing)")
        return EXIT_OK
    return _status(
        environ, as_json=args.json, timeout_s=args.timeout, wake=args.wake, stats_source=stats_source, lookup=lookup
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modal_vllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="is the deployed vLLM endpoint cold, warm, healthy?")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--wake",
        action="store_true",
        help="probe /health even when Modal reports zero containers (starts one: billed)",
    )
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
    cost.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="GPU=USD",
        help="USD per GPU hour, overriding the design's figure (repeatable), e.g. --price L4=0.85",
    )
    return parser


def _status(
    env: Mapping[str, str],
    *,
    as_json: bool,
    timeout_s: float,
    wake: bool,
    stats_source: StatsSource | None,
    lookup: WebUrlLookup | None,
) -> int:
    try:
        endpoint = resolve_endpoint(env, lookup=lookup)
    except (EndpointLookupError, ValueError) as exc:
        return _report_unresolved(str(exc), EXIT_UNHEALTHY, as_json)
    if endpoint is None:
        return _report_unresolved(NOT_CONFIGURED_MESSAGE, EXIT_NOT_CONFIGURED, as_json)

    expected = env.get("MODAL_MODEL", "").strip() or DEFAULT_MODEL
    stats, why_unknown = _container_count(env, stats_source)
    if stats is not None and stats.running_containers == 0 and not wake:
        status = cold_status(endpoint.url, expected, stats)
        _print(status, endpoint.source, as_json)
        return EXIT_COLD
    if stats is None:
        window = env.get("MODAL_SCALEDOWN_WINDOW_MINUTES", "").strip() or "5"
        print(
            f"warning: {why_unknown}. Probing {endpoint.url}/health: if the app is scaled to zero "
            f"this starts a GPU container, billed until the scale-down window ({window} min) "
            "passes. Set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET to check without waking it.",
            file=sys.stderr,
        )
    status = asyncio.run(probe_endpoint(endpoint.url, expected, headers=proxy_auth_headers(env), timeout_s=timeout_s))
    if stats is not None:
        status.containers, status.backlog = stats.running_containers, stats.backlog
    _print(status, endpoint.source, as_json)
    return EXIT_OK if status.ok else EXIT_UNHEALTHY


def _container_count(env: Mapping[str, str], source: StatsSource | None) -> tuple[FunctionStats | None, str]:
    """Modal's container count, or None and why it is unknown."""
    try:
        if not tokens_configured(env):
            return None, "no Modal API token (MODAL_TOKEN_ID/MODAL_TOKEN_SECRET), so the running containers are unknown"
        return read_stats(env, source=source), ""
    except ModalApiError as exc:  # half a token, refused token, app not deployed, no network
        return None, str(exc)


def _print(status: EndpointStatus, source: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**status.to_dict(), "source": source}, indent=2))
    else:
        _print_human(status, source)


def _report_unresolved(message: str, code: int, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "configured": code != EXIT_NOT_CONFIGURED, "message": message}))
    else:
        print(message, file=sys.stderr)
    return code


def _print_human(status: EndpointStatus, source: str) -> None:
    # Without a healthy answer the model list was never asked for, so a match is unknown.
    match = "unknown" if not status.healthy else "yes" if status.model_matches else "NO"
    containers = "unknown (no Modal API token)" if status.containers is None else str(status.containers)
    rows = [
        ("url", f"{status.url} (from {source})"),
        ("state", status.state),
        ("containers", containers),
        ("healthy", "not probed" if not status.probed else "yes" if status.healthy else "no"),
        ("latency", f"{status.probe_latency_s * 1000:.0f} ms" if status.http_status else "-"),
        ("served models", ", ".join(status.served_models) or "-"),
        ("expected model", f"{status.expected_model} (match: {match})"),
    ]
    for label, value in rows:
        print(f"{label:>15}: {value}")
    print(status.message)
    if status.state == "cold" and not status.probed:
        print("(not probed: a request would start a container; `status --wake` probes anyway)")


if __name__ == "__main__":
    sys.exit(main())
